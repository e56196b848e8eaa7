"""The manager's socket service: a synchronous poll loop around `ManagerCore`.

Sockets: `manager_router` at `cfg.listen` (requests and keepalives from schedulers, seed peers,
peers and the CLI) and `manager_pub` at the listen port + 1 (ClusterUpdate and PubHeartbeat;
an ephemeral port when the listen port is 0). `cfg.advertise`, when set, is the host others
should use to reach both.

The loop: poll until the core's next deadline (at most 100 ms, so a stop is noticed), decode
with drop-and-count, call the core, persist what it asks, then send and publish. Durable state
is written before anyone hears of it, so a subscriber never sees a seq the store lacks.
Remote input never ends the loop: bad frames are counted and dropped by `decode_routed`, and
an unexpected error in the core is logged and counted rather than taking the broker down.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import lmdb
import zmq

from brokers.manager.core import ManagerCore, Persist
from brokers.manager.opsservice import Ops
from brokers.manager.store import ManagerStore
from dfzmq import net
from dfzmq.config import ManagerConfig
from dfzmq.service import Counters, StopFlag, decode_routed, dispatch

log = logging.getLogger(__name__)

MAX_POLL_MS = 100
RECV_BATCH = 1000  # messages handled per wakeup before timers get a turn


def serve(cfg: ManagerConfig, ctx: zmq.Context, stop: StopFlag,
          on_ready: Callable[[dict], None] | None = None, *,
          curve: net.Curve | None = None) -> None:
    """Run the manager until `stop` is set. Raises ConfigError / StorageError on startup."""
    store = ManagerStore(cfg.data)
    router = pub = ops = metrics = accepted = None
    try:
        router = net.make_socket(ctx, "manager_router", curve)
        pub = net.make_socket(ctx, "manager_pub", curve)
        accepted = net.AcceptedPriority([router, pub])  # before the first accept
        router_bound = net.bind(router, cfg.listen)
        pub_bound = net.bind(pub, net.with_port_offset(net.tcp(cfg.listen), 1))
        addrs = {
            "router": net.advertise(router_bound, cfg.advertise or None),
            "pub": net.advertise(pub_bound, cfg.advertise or None),
        }
        counters = Counters()
        core = ManagerCore(store.cluster_id, cfg.heartbeat_interval_s, cfg.liveness,
                           store.members(), time.monotonic(), events_addr=addrs["pub"],
                           seq=store.seq(), counters=counters)
        log.info("manager %s ready: router %s, pub %s, %d members restored",
                 store.cluster_id, addrs["router"], addrs["pub"], len(core.members()))
        ops = Ops(cfg.data, addrs["pub"], counters)  # settings and jobs (brokers/manager/ops.py)
        core.config = ops.core.config
        if cfg.metrics:
            from brokers.manager.metrics import ManagerMetrics
            metrics = ManagerMetrics(cfg.metrics, counters)
            metrics.update(core)
            addrs["metrics"] = metrics.url
        if on_ready is not None:
            on_ready({**addrs, "cluster_id": store.cluster_id})
        _loop(core, router, pub, store, counters, stop, ops, metrics, accepted)
    finally:
        if accepted is not None:
            accepted.close()
        if ops is not None:
            ops.close()
        if metrics is not None:
            metrics.close()
        for sock in (router, pub):
            if sock is not None:
                sock.close(linger=0)
        store.close()
        log.info("manager stopped")


def _loop(core: ManagerCore, router: zmq.Socket, pub: zmq.Socket, store: ManagerStore,
          counters: Counters, stop: StopFlag, ops: Ops | None = None, metrics: Any = None,
          accepted: net.AcceptedPriority | None = None) -> None:
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    for mon in accepted.sockets if accepted is not None else ():
        poller.register(mon, zmq.POLLIN)
    while not stop:
        deadline = core.next_deadline() if ops is None else min(core.next_deadline(), ops.next_deadline())
        wait_s = deadline - time.monotonic()
        timeout_ms = max(0, min(MAX_POLL_MS, int(wait_s * 1000) + 1))
        events = dict(poller.poll(timeout_ms))
        if accepted is not None:
            accepted.tend(events)
        if router in events:
            for _ in range(RECV_BATCH):
                try:
                    frames = router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                got = decode_routed(frames, counters)
                if got is None:
                    continue
                ident, msg = got
                if ops is not None and ops.handles(msg):
                    ops.handle(ident, msg, router, pub)
                    core.config = ops.core.config  # members get the settings on registering too
                    continue
                _apply(_guard(core.handle, counters, ident, msg, time.monotonic()),
                       router, pub, store, counters)
        now = time.monotonic()
        if now >= core.next_deadline():
            _apply(_guard(core.handle_timer, counters, now), router, pub, store, counters)
            if metrics is not None:
                _guard(metrics.update, counters, core)
        if ops is not None:
            ops.tick(router, pub)


def _guard(fn: Callable[..., list], counters: Counters, *args: Any) -> list:
    try:
        return fn(*args)
    except Exception:  # a core bug must not take the cluster's broker down with it
        counters["internal-error"] += 1  # the schedulers' name too
        log.exception("manager core failed on %r", args[:2])
        return []


def _apply(actions: list, router: zmq.Socket, pub: zmq.Socket, store: ManagerStore,
           counters: Counters) -> None:
    persist = [(a.member, a.seq) for a in actions if isinstance(a, Persist)]
    if persist:
        try:
            store.put_members(persist)
        except lmdb.Error as e:
            counters["error.store"] += 1
            log.error("manager store write failed (state kept in memory): %s", e)
    dispatch([a for a in actions if not isinstance(a, Persist)], router, pub, counters)
