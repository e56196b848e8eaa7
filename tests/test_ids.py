"""dfzmq/ids.py: task ids ignore what only signs a URL and keep what selects content;
rendezvous hashing is deterministic and moves only a removed member's tasks."""

from __future__ import annotations

import re

import pytest

from dfzmq import ids

BASE = "https://bucket.s3.amazonaws.com/models/llama.bin"


def tid(url: str, **kw) -> str:
    return ids.task_id(url, **kw)


def test_task_id_shape_and_determinism():
    t = tid(BASE)
    assert re.fullmatch(r"[0-9a-f]{64}", t)
    assert tid(BASE) == t


@pytest.mark.parametrize("query", [
    # S3 presigned (SigV4 and SigV2)
    "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20240101%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=abc123",
    "x-amz-security-token=tok&x-amz-signature=def",
    "AWSAccessKeyId=AKIA&Expires=1700000000&Signature=sig%3D%3D",
    # GCS
    "X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=c&X-Goog-Date=d&X-Goog-Expires=900"
    "&X-Goog-SignedHeaders=host&X-Goog-Signature=ff",
    "GoogleAccessId=svc&Expires=1&Signature=s",
    # OSS
    "OSSAccessKeyId=k&Expires=2&Signature=s&x-oss-security-token=t",
    # Azure SAS
    "sv=2021-08-06&ss=b&srt=o&sp=r&se=2024-01-01&st=2023-01-01&spr=https&sig=abc",
    # CloudFront
    "Policy=p&Key-Pair-Id=k&Signature=s",
])
def test_signature_params_do_not_change_the_task_id(query):
    assert tid(f"{BASE}?{query}") == tid(BASE)


def test_signature_params_keep_real_params():
    signed_a = f"{BASE}?versionId=7&X-Amz-Signature=aaa&X-Amz-Date=1"
    signed_b = f"{BASE}?X-Amz-Date=2&versionId=7&X-Amz-Signature=bbb"
    assert tid(signed_a) == tid(signed_b) == tid(f"{BASE}?versionId=7")
    assert tid(signed_a) != tid(BASE)


@pytest.mark.parametrize("other", [
    f"{BASE}?versionId=8",
    f"{BASE}?versionId=7&part=2",
    f"{BASE}?versionid=7",  # real params are case-sensitive
    f"{BASE}?signature_version=4&versionId=7",  # only whole names are filtered
    f"{BASE}x?versionId=7",
    BASE.replace("/models/", "/Models/") + "?versionId=7",  # paths are case-sensitive
    BASE.replace("https", "http") + "?versionId=7",
])
def test_real_params_and_paths_change_the_task_id(other):
    assert tid(other) != tid(f"{BASE}?versionId=7")


def test_equivalent_spellings_are_one_task():
    assert tid(f"{BASE}?b=2&a=1") == tid(f"{BASE}?a=1&b=2")
    assert tid(f"{BASE}#fragment") == tid(BASE)
    assert tid("HTTPS://Bucket.S3.AmazonAWS.com/models/llama.bin") == tid(BASE)
    assert tid(f"{BASE}?a=%2F") == tid(f"{BASE}?a=/")


def test_extra_filters():
    assert tid(f"{BASE}?token=1", extra_filters=("Token",)) == tid(BASE)
    assert tid(f"{BASE}?token=1") != tid(BASE)


def test_normalize_url():
    assert ids.normalize_url(f"{BASE}?z=1&X-Amz-Signature=s&a=2#f") == f"{BASE}?a=2&z=1"


def test_tag_and_application_change_the_task_id():
    plain = tid(BASE)
    tagged = {tid(BASE, tag="v1"), tid(BASE, tag="v2"), tid(BASE, application="app"),
              tid(BASE, tag="v1", application="app")}
    assert plain not in tagged and len(tagged) == 4
    # the separator keeps (tag, application) pairs apart
    assert tid(BASE, tag="a", application="b") != tid(BASE, tag="a\0b")
    assert tid(BASE, tag="ab") != tid(BASE, tag="a", application="b")


def test_content_digest_is_the_identity():
    d = "sha256:" + "ab" * 32
    a = tid("https://registry-1.docker.io/v2/library/nginx/blobs/" + d, content_digest=d)
    b = tid("https://mirror.example.com/v2/library/nginx/blobs/" + d + "?X-Amz-Signature=x", content_digest=d)
    assert a == b
    assert tid("anything", content_digest=d.upper().replace("SHA256", "sha256")) == a
    assert a != tid("https://registry-1.docker.io/v2/library/nginx/blobs/" + d)
    assert a != tid("x", content_digest="sha256:" + "cd" * 32)
    assert a != tid("x", content_digest=d, tag="t")


def test_new_id_and_host_id():
    a, b = ids.new_id("peer"), ids.new_id("peer")
    assert a != b and a.startswith("peer-") and len(a) == len("peer-") + 12
    assert ids.host_id("node1") == ids.host_id("node1")
    assert ids.host_id("node1") != ids.host_id("node1", salt="2") != ids.host_id("node2")
    assert ids.host_id("node1").startswith("node1-")
    assert ids.host_id()  # the machine's own name
    assert ids.short("0123456789abcdef") == "0123456789ab"


MEMBERS = [f"sched-{i}" for i in range(5)]
TASKS = [tid(f"https://example.com/f{i}") for i in range(2000)]


def test_rendezvous_is_deterministic_and_order_independent():
    for t in TASKS[:200]:
        order = ids.rendezvous(t, MEMBERS)
        assert sorted(order) == sorted(MEMBERS)
        assert ids.rendezvous(t, list(reversed(MEMBERS))) == order
        assert ids.rendezvous(t, MEMBERS) == order
    assert ids.rendezvous(TASKS[0], []) == []


def test_rendezvous_spreads_tasks():
    owners = [ids.rendezvous(t, MEMBERS)[0] for t in TASKS]
    for m in MEMBERS:
        assert 0.12 < owners.count(m) / len(TASKS) < 0.28


@pytest.mark.parametrize("gone", MEMBERS)
def test_removing_a_member_moves_only_its_tasks(gone):
    rest = [m for m in MEMBERS if m != gone]
    moved = 0
    for t in TASKS:
        before = ids.rendezvous(t, MEMBERS)
        after = ids.rendezvous(t, rest)
        if before[0] == gone:
            moved += 1
            assert after[0] == before[1]  # its tasks go to their next choice
        else:
            assert after[0] == before[0]
        assert after == [m for m in before if m != gone]
    assert moved > 0


def test_adding_a_member_takes_tasks_only_for_itself():
    new = MEMBERS + ["sched-new"]
    for t in TASKS:
        before, after = ids.rendezvous(t, MEMBERS)[0], ids.rendezvous(t, new)[0]
        assert after in (before, "sched-new")
