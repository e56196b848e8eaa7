"""brokers/scheduler/parents.py: a Running peer far behind the others gets more parents, on the
fake network of tests/test_scheduler_core.py."""

from __future__ import annotations

from brokers.scheduler import parents as parents_mod
from dfzmq import wire
from tests.test_scheduler_core import FakeNet

PIECES = 100


def swarm(n: int = 8, max_parents: int = 3):
    net = FakeNet(max_parents=max_parents)
    hosts = [net.host(f"h{i}") for i in range(n)]
    hosts[0].register()  # the source
    hosts[0].report(range(PIECES), content_length=PIECES * 100)
    for h in hosts[1:]:
        h.register()
    net.advance(2.0)
    for h in hosts:
        h.take()
    return net, hosts


def test_a_peer_far_behind_the_median_gets_one_more_parent_per_refresh_up_to_a_cap():
    net, hosts = swarm()
    for h in hosts[1:6]:
        h.report(range(60), source="p2p")
    slow = hosts[6]
    slow.report(range(20), source="p2p")  # 40% behind the median
    hosts[7].report(range(57), source="p2p")  # 3% behind: fine
    net.advance(1.0)
    grown = [m for m in slow.take(wire.PeerParents)]
    assert grown and len(grown[-1].parents) == 4
    assert hosts[7].take(wire.PeerParents) == []
    assert all(h.take(wire.PeerParents) == [] for h in hosts[1:6])
    net.advance(5.0)
    last = slow.take(wire.PeerParents)[-1].parents
    assert len(last) == 3 + parents_mod.LAG_EXTRA_PARENTS
    ids = [p.peer_id for p in last]
    assert len(set(ids)) == len(ids) and slow.peer() not in ids
    assert net.core.counters["parents-laggard"] == parents_mod.LAG_EXTRA_PARENTS


def test_extra_parents_are_the_best_scored_ones_and_nobody_loses_a_parent():
    net, hosts = swarm()
    before = {h.host_id: list(net.core.peers[h.peer()].parents) for h in hosts[1:]}
    for h in hosts[1:7]:
        h.report(range(70), source="p2p")
    hosts[7].report(range(5), source="p2p")
    net.advance(1.0)
    after = [p.peer_id for p in hosts[7].take(wire.PeerParents)[-1].parents]
    assert after[:3] == before["h7"]  # kept, in order
    added = net.core.peers[after[3]]
    assert len(added.pieces) >= 70  # one of the peers furthest on (or the source)
    for h in hosts[1:7]:
        assert list(net.core.peers[h.peer()].parents) == before[h.host_id]


def test_no_boost_in_a_small_or_even_swarm():
    net, hosts = swarm(n=3)
    hosts[1].report(range(90), source="p2p")
    hosts[2].report(range(1), source="p2p")
    net.advance(2.0)  # two Running peers: no median worth the name
    assert hosts[2].take(wire.PeerParents) == []
    net, hosts = swarm()
    for h in hosts[1:]:
        h.report(range(50), source="p2p")
    net.advance(3.0)
    assert net.core.counters["parents-laggard"] == 0


def test_a_laggard_keeps_its_extra_parents_when_one_of_them_leaves():
    net, hosts = swarm(max_parents=3)
    for h in hosts[1:6]:
        h.report(range(60), source="p2p")
    slow = hosts[6]
    slow.report(range(20), source="p2p")
    hosts[7].report(range(57), source="p2p")
    net.advance(5.0)
    before = [p for p in net.core.peers[slow.peer()].parents]
    assert len(before) == 3 + parents_mod.LAG_EXTRA_PARENTS
    leaving = next(h for h in hosts[1:] if h.peer() in before and h.peer() != hosts[0].peer())
    slow.take()
    leaving.send(wire.PeerLeave(net.core.peers[leaving.peer()].task_id, leaving.peer()))
    net.advance(0.25)
    after = [p.peer_id for p in slow.take(wire.PeerParents)[-1].parents]
    assert leaving.peer() not in after
    assert set(before) - {leaving.peer()} <= set(after)  # the healthy ones all stay


def test_a_laggards_extra_parent_is_the_host_with_the_biggest_share_of_uplink():
    """With half the hosts on slow uplinks (measured from their HostStats), the extra parent of
    a peer far behind is a fast one, though slow ones hold as many pieces."""
    net, hosts = swarm(n=10)
    for i, h in enumerate(hosts):
        host = net.core.hosts[h.host_id]
        rate = 300_000 if i % 2 else 1_500_000  # odd hosts slow
        for k in range(4):
            net.core.note_uplink(host, k * rate, net.now + k)
    for h in hosts[1:9]:
        h.report(range(80), source="p2p")
    behind = hosts[9]
    behind.report(range(10), source="p2p")
    before = set(net.core.peers[behind.peer()].parents)
    net.advance(5.0)
    added = [p.peer_id for p in behind.take(wire.PeerParents)[-1].parents if p.peer_id not in before]
    assert len(added) == parents_mod.LAG_EXTRA_PARENTS
    assert all(int(net.core.peers[pid].host_id[1:]) % 2 == 0 for pid in added)  # fast hosts


def test_a_peer_whose_parents_uplinks_give_it_little_gets_more_before_it_falls_behind():
    """Starved: even progress, but one peer's parents are all slow hosts. Measured uplinks show
    it, and it gets parents as a laggard does; a peer with no slow parent gets none."""
    net, hosts = swarm(n=10, max_parents=3)
    slow = {"h7", "h8", "h9"}
    for h in hosts:
        rate = 100_000 if h.host_id in slow else 2_000_000
        for k in range(4):
            net.core.note_uplink(net.core.hosts[h.host_id], k * rate, net.now + k)
    starved = hosts[1]
    net.core._set_parents(net.core.peers[starved.peer()],
                          {h.peer(): h.host_id for h in hosts if h.host_id in slow})
    for h in hosts[1:]:
        h.report(range(40), source="p2p")  # nobody behind
    served = {h.host_id: set(net.core.peers[h.peer()].parents.values()) for h in hosts[2:]}
    assert any(not parents & slow for parents in served.values())
    net.advance(1.0)
    grown = starved.take(wire.PeerParents)
    assert grown and len(grown[-1].parents) == 4
    assert grown[-1].parents[-1].host_id not in slow  # the best share: a fast host
    assert net.core.counters["parents-starved"] >= 1 and net.core.counters["parents-laggard"] == 0
    for h in hosts[2:]:
        if not served[h.host_id] & slow:
            assert h.take(wire.PeerParents) == []


def test_no_starved_boost_until_most_uplinks_are_measured():
    net, hosts = swarm(n=10, max_parents=3)
    peer = net.core.peers[hosts[1].peer()]
    net.core._set_parents(peer, {net.core.peers[h.peer()].peer_id: h.host_id for h in hosts[7:10]})
    for h in hosts[7:10]:  # only the three slow ones measured
        for k in range(4):
            net.core.note_uplink(net.core.hosts[h.host_id], k * 100_000, net.now + k)
    for h in hosts[1:]:
        h.report(range(40), source="p2p")
    net.advance(2.0)
    assert net.core.counters["parents-starved"] == 0


def test_a_peer_short_of_parents_gets_new_candidates_within_the_fill_delay():
    """The first peer to register finds only the source; the peers registering just after it
    join its list within FILL_DELAY_S, not at the next refresh a second later."""
    net = FakeNet(max_parents=4)
    hosts = [net.host(f"h{i}") for i in range(6)]
    hosts[0].register()
    hosts[0].report(range(PIECES), content_length=PIECES * 100)
    net.advance(0.5, step=0.05)  # past the first refresh: the next is ~1 s away
    first = hosts[1]
    first.register()
    assert [p.peer_id for p in first.one(wire.PeerParents).parents] == [hosts[0].peer()]
    assert net.core._next_refresh - net.now > 0.5
    for h in hosts[2:]:
        h.register()
    net.advance(parents_mod.FILL_DELAY_S + 0.05, step=0.05)
    lists = first.take(wire.PeerParents)
    assert lists and len(lists[-1].parents) == 4
    assert net.core.counters["parents-filled"] >= 1
    assert net.core._next_refresh - net.now > 0.3  # the fill, not the periodic refresh
    assert first.peer() not in net.core.tasks[TASK_ID(net)].short


def TASK_ID(net: FakeNet) -> str:
    return next(iter(net.core.tasks))


def test_a_full_parent_list_is_not_short_and_a_leaving_peer_is_forgotten():
    net, hosts = swarm(n=8, max_parents=3)
    task = net.core.tasks[TASK_ID(net)]
    assert not task.short  # everyone found three parents at registration or the refresh
    lone = net.core.peers[hosts[1].peer()]
    net.core._set_parents(lone, {hosts[0].peer(): hosts[0].host_id})
    assert lone.peer_id in task.short
    hosts[1].send(wire.PeerLeave(lone.task_id, lone.peer_id))
    assert lone.peer_id not in task.short


def test_a_fill_offers_the_newcomers_only_and_leaves_the_rest_to_the_refresh():
    """A short peer that could not use an older candidate (out of upload slots) is not searched
    again on every join: a fill scores only the candidates that joined since the last one."""
    net = FakeNet(max_parents=4)
    hosts = [net.host(f"h{i}") for i in range(4)]
    hosts[0].register()
    hosts[0].report(range(PIECES), content_length=PIECES * 100)
    net.advance(0.5, step=0.05)
    first = hosts[1]
    first.register()
    hosts[2].register()
    net.advance(parents_mod.FILL_DELAY_S + 0.05, step=0.05)
    assert [p.host_id for p in first.take(wire.PeerParents)[-1].parents] == ["h0", "h2"]
    task = net.core.tasks[TASK_ID(net)]
    peer = net.core.peers[first.peer()]
    net.core._set_parents(peer, {hosts[0].peer(): "h0"})  # as if h2 had been out of slots
    hosts[3].register()
    net.advance(parents_mod.FILL_DELAY_S + 0.05, step=0.05)
    got = [p.host_id for p in first.take(wire.PeerParents)[-1].parents]
    assert got == ["h0", "h3"] and peer.peer_id in task.short and not task.joined


def children(net: FakeNet) -> dict[str, int]:
    return dict(net.core._children)


def test_peers_that_register_last_are_given_children_at_the_next_refresh():
    """Everyone's list is full when the last peers register, so nobody would take them as a
    parent and their uplinks would idle (lab, N=32: the last eight had 0-2 children for half of
    the run). The refresh adds them to the lists of the peers they help most, a child a round to
    each, and only adds."""
    net, hosts = swarm(n=12, max_parents=4)
    before = {h.host_id: list(net.core.peers[h.peer()].parents) for h in hosts[1:]}
    assert not net.core.tasks[TASK_ID(net)].short
    late = [net.host(f"late{i}") for i in range(3)]
    for h in late:
        h.register()
    net.advance(1.0)
    kids = children(net)
    peers = [h.host_id for h in hosts[1:] + late]
    average = sum(kids.get(h, 0) for h in peers) / len(peers)
    for h in late:
        assert kids.get(h.host_id, 0) >= max(2, average - 1.5), (kids, average)
    assert net.core.counters["parents-fed"] >= 3
    for h in hosts[1:]:
        lists = h.take(wire.PeerParents)
        if lists:  # added, never swapped, one a pass at most, within the cap
            got = [p.peer_id for p in lists[-1].parents]
            assert got[:-1] == before[h.host_id] and len(got) == 4 + parents_mod.FEED_EXTRA_PARENTS


def test_the_uplinks_of_peers_that_finished_serve_the_peers_still_downloading():
    net, hosts = swarm(n=10, max_parents=5)
    still = hosts[7:]
    busy = {h for s in still for h in net.core.peers[s.peer()].parents.values()}
    for h in hosts[1:7]:
        h.report(range(PIECES), source="p2p")
        h.done(PIECES)
    for h in still:
        h.take()
    idle = [h.host_id for h in hosts[1:7] if h.host_id not in busy]
    assert idle  # finished peers whose children are all gone
    net.advance(1.0)
    now_parents = {h for s in still for h in net.core.peers[s.peer()].parents.values()}
    assert now_parents & set(idle)
    for s in still:  # one more parent a pass at most
        assert len(net.core.peers[s.peer()].parents) <= 6
    net.advance(5.0)
    for s in still:
        assert len(net.core.peers[s.peer()].parents) <= 5 + parents_mod.LAG_EXTRA_PARENTS


def test_an_even_swarm_is_left_alone():
    net = FakeNet(max_parents=3)
    hosts = [net.host(f"h{i}") for i in range(5)]
    hosts[0].register()
    hosts[0].report(range(PIECES), content_length=PIECES * 100)
    for h in hosts[1:]:
        h.register()
    net.advance(3.0)
    assert net.core.counters["parents-fed"] == 0


def test_a_boost_does_not_pick_a_host_that_already_has_more_than_its_share_of_children():
    """Every boost used to take the best-scored candidate, so boosts piled onto one host (lab,
    N=32: 7 to 22 children in three seconds)."""
    net, hosts = swarm(n=10, max_parents=3)
    core = net.core
    crowded = hosts[5]
    for h in hosts[1:9]:
        h.report(range(100 if h is crowded else 50), source="p2p")  # the best-scored candidate
    for h in hosts[1:5] + hosts[6:9]:
        peer = core.peers[h.peer()]
        core._set_parents(peer, {**peer.parents, crowded.peer(): crowded.host_id})
    slow = hosts[9]
    slow.report(range(50, 55), source="p2p")  # far behind: a laggard
    for h in hosts:
        h.take()
    net.advance(1.0)
    added = [p.host_id for p in slow.take(wire.PeerParents)[-1].parents][3:]
    assert added and crowded.host_id not in added
    _, kids, average = core._average_children(core.tasks[TASK_ID(net)], net.now)
    assert all(kids.get(h, 0) <= average + 1 for h in added)


def test_the_feed_keeps_to_upload_slots_and_to_the_tasks_own_load():
    net, hosts = swarm(n=12, max_parents=5)
    small = net.host("small", slots=2)
    small.register()
    net.advance(1.0)
    assert net.core._children_of_host("small") <= 2
    fed = net.core.counters["parents-fed"]
    other = "o" * 64  # a busy host in another task must not make this task's hosts look idle
    for h in hosts[1:6]:
        h.register(task=other)
    net.advance(2.0)
    busy = {h: net.core._children_of_host(h) for h in net.core._children}
    assert net.core.counters["parents-fed"] - fed <= 2, (busy, dict(net.core.counters))


def measure(net: FakeNet, hosts, rate_of) -> None:
    """Uplinks as the hosts' HostStats would show them: rate_of(host) bytes/s."""
    for h in hosts:
        for k in range(4):
            net.core.note_uplink(net.core.hosts[h.host_id], k * rate_of(h), net.now + k)


def test_a_boost_takes_the_biggest_share_of_uplink_over_a_better_scored_slow_host():
    """Slow hosts further on and with fewer children score higher (pieces, free slots), but a
    peer behind needs bytes: its extra parent is a fast host (lab, N=32, slow half: a starved
    peer's first extra parents were slow hosts)."""
    net, hosts = swarm(n=10, max_parents=3)
    core = net.core
    fast, slow = hosts[1:5], hosts[5:9]
    measure(net, hosts, lambda h: 500_000 if h in fast or h is hosts[0] else 100_000)  # 3 and 0.6 Mbit/s
    for h in fast:
        h.report(range(50), source="p2p")
    for h in slow:
        h.report(range(PIECES), source="p2p")  # every piece, still uploading
    behind = hosts[9]
    behind.report(range(5), source="p2p")
    peer = core.peers[behind.peer()]
    for h in hosts:
        h.take()
    ranked = core._ranked(peer, core.tasks[TASK_ID(net)],
                          [core.peers[h.peer()] for h in fast + slow if h.peer() not in peer.parents])
    assert ranked[0].host_id in {h.host_id for h in slow}  # what the score alone would pick
    net.advance(1.0)
    added = [p.host_id for p in behind.take(wire.PeerParents)[-1].parents][3:]
    assert added and all(h in {f.host_id for f in fast} for h in added), added


def test_a_boost_by_uplink_still_takes_a_host_further_on_than_the_peer():
    """A newcomer with nothing yet and no children has the biggest share of uplink on paper (an
    unmeasured uplink counts as the median): a peer behind must not get it as its extra parent."""
    net, hosts = swarm(n=10, max_parents=3)
    core = net.core
    measure(net, hosts, lambda h: 500_000)
    for h in hosts[1:9]:
        h.report(range(60), source="p2p")
    behind = hosts[9]
    behind.report(range(10), source="p2p")
    fresh = [net.host(f"new{i}") for i in range(3)]
    for h in fresh:
        h.register()
    for h in hosts + fresh:
        h.take()
    net.advance(1.0)
    added = [p.host_id for p in behind.take(wire.PeerParents)[-1].parents][3:]
    assert added and not any(h.startswith("new") for h in added), added


def test_the_peer_given_least_is_fed_a_fast_idle_uplink_before_a_slow_one_with_fewer_children():
    """Idle hosts used to be offered fewest children first: a slow host is often the one with
    fewest (its children finish their pieces there last), so the poorest peer got it and gained
    little (lab, N=32, slow half). Now the fastest idle host goes first."""
    net, hosts = swarm(n=12, max_parents=4)
    core = net.core
    late = [net.host("lateslow"), net.host("latefast")]
    for h in late:
        h.register()
    net.advance(0.2)  # they have parents: Running, so possible parents themselves
    measure(net, hosts + late, lambda h: 100_000 if h.host_id == "lateslow" else 500_000)
    cap = core.max_parents + parents_mod.FEED_EXTRA_PARENTS
    ring = [core.peers[h.peer()] for h in hosts[1:]]
    poor = ring[0]
    fast = core.peers[late[1].peer()]
    for i, p in enumerate(ring[1:] + [core.peers[h.peer()] for h in late], start=1):
        # Everyone else has a full list, spread evenly over the ring; latefast has one child.
        pick = [ring[(i + k) % len(ring)] for k in range(1, cap + 1)]
        pick = [q for q in pick if q is not p][:cap - 1] + ([fast] if p is ring[1] else [ring[(i + cap + 1) % len(ring)]])
        core._set_parents(p, {q.peer_id: q.host_id for q in pick})
    kids = {h: core._children_of_host(h) for h in ["latefast", "lateslow"] + [q.host_id for q in ring]}
    assert kids["lateslow"] == 0 and kids["latefast"] == 1 and min(kids[q.host_id] for q in ring) > 1, kids
    before = set(poor.parents)
    net.advance(1.0)
    added = [core.peers[pid].host_id for pid in poor.parents if pid not in before]
    assert added and added[0] != "lateslow", added
