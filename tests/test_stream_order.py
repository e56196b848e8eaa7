"""While a proxy client reads a task in order, its pieces are asked for in order from where the
client reads (nodes/picker.py stream_offset, set by nodes/proxy.py), so the client's reads overlap
the download; with no reader the picker is rarest-first again."""

from __future__ import annotations

import random
import types

from dfzmq.wire import PieceInfo
from nodes.picker import Picker
from nodes.proxy import ProxyServer

L = 1000


def make(n: int, window_pieces: int = 4) -> Picker:
    p = Picker(window_bytes=window_pieces * L, rng=random.Random(1), endgame_after_s=0.0)
    p.add_manifest([PieceInfo(i, i * L, L, f"{i:064x}") for i in range(n)])
    p.complete = True
    return p


def drain(p: Picker, now: float = 0.0) -> list[int]:
    """Every piece number in the order the picker asks for them, pieces arriving in order."""
    order = []
    while len(p.have) < len(p.manifest):
        reqs = p.next_requests(now)
        assert reqs, "stalled"
        for pid, num in reqs:
            order.append(num)
        for pid, num in reqs:
            p.on_piece(pid, num, now)
    return order


def test_in_order_from_the_start():
    p = make(40)
    p.add_parent("a")
    p.on_have("a", list(range(40)))
    p.stream_offset = 0
    assert drain(p) == list(range(40))


def test_from_mid_piece_then_the_rest():
    p = make(20)
    p.add_parent("a")
    p.on_have("a", list(range(20)))
    p.stream_offset = 7 * L + 10  # inside piece 7: it comes first, the earlier pieces last
    assert drain(p) == list(range(7, 20)) + list(range(7))


def test_seed_and_peer_both_serve_the_next_pieces():
    p = make(30)
    p.add_parent("seed", seed=True)
    p.add_parent("peer")
    p.on_have("seed", list(range(30)))
    p.on_have("peer", list(range(30)))
    p.stream_offset = 0
    first = p.next_requests(0.0)
    nums = sorted(n for _, n in first)
    assert nums == list(range(len(nums)))  # the lowest pieces, whoever serves them
    assert {pid for pid, _ in first} == {"seed", "peer"}


def test_without_a_reader_rarest_first_again():
    def two_parents(offset: int) -> list[int]:
        p = make(10)
        p.add_parent("a")
        p.add_parent("b")
        p.on_have("a", list(range(10)))
        p.on_have("b", list(range(9)))  # piece 9 is held by one parent only: the rarest
        p.stream_offset = offset
        return sorted(n for _, n in p.next_requests(0.0))

    assert 9 in two_parents(-1)  # rarest first
    streamed = two_parents(0)
    assert 9 not in streamed and streamed == list(range(len(streamed)))  # in order


def test_proxy_readers_set_and_clear_the_offset():
    pumped = []
    run = types.SimpleNamespace(task_id="t", picker=make(10), _pump=lambda: pumped.append(1))
    proxy = types.SimpleNamespace(readers={})
    ProxyServer._reading(proxy, run, 5000, +1)
    assert run.picker.stream_offset == 5000 and pumped
    ProxyServer._reading(proxy, run, 2000, +1)  # a second client further back: the lower offset
    assert run.picker.stream_offset == 2000
    ProxyServer._reading(proxy, run, 2000, -1)
    assert run.picker.stream_offset == 5000
    ProxyServer._reading(proxy, run, 5000, -1)
    assert run.picker.stream_offset == -1 and proxy.readers == {}
