"""The proxy across hosts: a peer's proxy, on the peer's own address in its own namespace,
serves a matched URL peer to peer from the hosts that hold it, byte-identical to the origin's.

The same run as `tools/bench.py proxynet`, small; it checks where the bytes came from, never
how long they took.
"""

from __future__ import annotations

import pytest

from tools import labproxy, netlab


@pytest.mark.timeout(180)
def test_proxy_across_hosts_serves_from_peers():
    reason = netlab.unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces cannot be made here: {reason}")
    size = 16 * 2**20
    result = labproxy.run_proxy_net(16, 400, 1)

    assert result["ok"]  # both copies match the file's sha256
    (row,) = result["rounds"]
    assert row["p2p_bytes"] == size and row["origin_bytes"] == 0  # the proxy's daemon never read the origin
    # the origin served h1's first fetch (through the seed) and the direct curl, nothing more
    assert result["origin_over_f"] == pytest.approx(2.0, abs=0.01)
    assert "ratio" in labproxy.report(result)
