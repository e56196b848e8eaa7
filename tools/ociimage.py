"""Build a small OCI image layout on disk without a container runtime (for tests and demos).

`make_image(dir, tag, layer_sizes)` writes `oci-layout`, `index.json` and `blobs/sha256/...`:
one gzip-compressed tar layer per size (each holding one file of pseudo-random bytes), an image
config and a manifest. `skopeo copy oci:DIR:TAG docker://...` pushes it to a registry.
Returns {digest: size} of every blob (config and layers), so a test can check what a registry
served. Deterministic for a given seed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from pathlib import Path


def _put(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest.split(":")[1]).write_bytes(data)
    return digest, len(data)


def _layer(size: int, rng: random.Random, name: str) -> tuple[bytes, str]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mtime = 0
        tar.addfile(info, io.BytesIO(rng.randbytes(size)))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, compresslevel=1, mtime=0), "sha256:" + hashlib.sha256(tar_bytes).hexdigest()


def make_image(root: Path, tag: str = "v1", layer_sizes: tuple[int, ...] = (1 << 20,), seed: int = 0) -> dict[str, int]:
    root = Path(root)
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sizes: dict[str, int] = {}
    layers, diff_ids = [], []
    for i, size in enumerate(layer_sizes):
        gz, diff_id = _layer(size, rng, f"data{i}.bin")
        digest, n = _put(blobs, gz)
        sizes[digest] = n
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": n})
        diff_ids.append(diff_id)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    cdigest, csize = _put(blobs, config)
    sizes[cdigest] = csize
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest, "size": csize},
        "layers": layers,
    }).encode()
    mdigest, msize = _put(blobs, manifest)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest, "size": msize,
         "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return sizes
