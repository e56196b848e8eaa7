"""dfzmq/wire.py: every registered message round-trips, payloads stay raw frames, and hostile
frames of every kind raise RemoteProtocolError (and nothing else), so a service loop can count
and drop them."""

from __future__ import annotations

import random
import typing
from typing import Any

import msgpack
import pytest
import zmq

from dfzmq import wire
from dfzmq.errors import LocalProtocolError, RemoteProtocolError
from dfzmq.wire import MemberInfo, ParentInfo, PieceInfo

TASK = "ab" * 32
PIECES = [PieceInfo(0, 0, 65536, "11" * 32), PieceInfo(1, 65536, 1234, "22" * 32)]
MEMBERS = [
    MemberInfo("sched-1", "scheduler", "tcp://10.0.0.1:5555", "tcp://10.0.0.1:5556", "s1", "0.1", "up", "idc-a", "cn|bj"),
    MemberInfo("seed-1", "seed", "tcp://10.0.0.2:6000"),
]
PARENTS = [ParentInfo("peer-1", "host-1", "tcp://10.0.0.3:7000"), ParentInfo("seed-1", "host-2", "tcp://10.0.0.2:7000", True)]

# Plausible values by field name; anything not listed falls back to a value built from its type.
BY_NAME: dict[str, Any] = {
    "task_id": TASK,
    "peer_id": "peer-0a1b2c3d4e5f",
    "host_id": "host-a-0123456789",
    "url": "https://example.com/models/weights.bin?version=3",
    "headers": {"Authorization": "Bearer x", "Range": "bytes=0-"},
    "pieces": PIECES,
    "member": MEMBERS[0],
    "members": MEMBERS,
    "schedulers": MEMBERS[:1],
    "seeds": MEMBERS[1:],
    "parents": PARENTS,
    "nums": [0, 1, 5, 4096],
    "digest": "33" * 32,
    "file_digest": "44" * 32,
    "content_length": 3 * 65536 + 7,
    "data": b"\x00\x01piece bytes\xff" * 100,
    "config": {"piece_timeout_s": 20.0, "names": ["a", "b"], "nested": {"x": None, "y": True}},
    "stats": {"bytes": 123, "peers": ["p1"], "ratio": 0.5},
    "info": {"counters": {"a": 1}, "state": "up"},
    "fields": {"peer": "p1", "bytes": 10, "ok": False},
    "blocklist": ["peer-9"],
    "bad": ["peer-8"],
    "upload_addr": "tcp://10.0.0.3:7000",
    "output": "/tmp/out.bin",
}


def sample(tp: Any, name: str) -> Any:
    if name in BY_NAME:
        return BY_NAME[name]
    if tp is wire.Payload:
        return b"payload"
    if tp is bool:
        return True
    if tp is int:
        return 42
    if tp is float:
        return 2.5
    if tp is str:
        return f"{name}-value"
    if tp is bytes:
        return b"\x05\x01"
    if tp is Any:
        return {"k": [1, "two", None]}
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return [sample(item, name), sample(item, name)]
    if origin is dict:
        return {"key": sample(typing.get_args(tp)[1], name)}
    if getattr(tp, "_record", False):
        return tp(**{n: sample(t, n) for n, t, _ in tp._fields})
    raise AssertionError(f"no sample for {name}: {tp!r}")


def build(cls: type) -> Any:
    return cls(**{name: sample(tp, name) for name, tp, _ in cls._fields})


ALL = sorted(wire.REGISTRY.values(), key=lambda c: c.KIND)
VALID = [wire.encode(build(cls)) for cls in ALL]


def assert_hostile(frames: list[Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        wire.decode(frames)


def decode_or_protocol_error(frames: list[Any]) -> Any:
    """Decode, letting only RemoteProtocolError through; anything else fails the test."""
    try:
        return wire.decode(frames)
    except RemoteProtocolError:
        return None


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.KIND.decode())
def test_round_trip_every_message(cls):
    msg = build(cls)
    frames = wire.encode(msg)
    assert frames[0] == wire.MAGIC and frames[1] == cls.KIND
    assert len(frames) == 3 + len(cls._payloads)
    assert all(isinstance(f, (bytes, bytearray, memoryview)) for f in frames)
    back = wire.decode(frames)
    assert type(back) is cls
    assert back == msg


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.KIND.decode())
def test_defaults_round_trip(cls):
    """Only the required fields set: optional ones keep their defaults after a round trip."""
    kwargs = {name: sample(tp, name) for name, tp, f in cls._fields if wire._required(f)}
    msg = cls(**kwargs)
    assert wire.decode(wire.encode(msg)) == msg


def test_registry_kinds_are_unique_and_match():
    assert len(wire.REGISTRY) >= 30
    for kind, cls in wire.REGISTRY.items():
        assert cls.KIND == kind
    with pytest.raises(LocalProtocolError):
        wire.message("HEARTBEAT")(type("Again", (), {"__annotations__": {}}))


def test_decode_accepts_memoryviews_bytearrays_and_zmq_frames():
    msg = build(wire.PieceData)
    frames = wire.encode(msg)
    for conv in (memoryview, bytearray, zmq.Frame):
        back = wire.decode([conv(bytes(f)) for f in frames])
        assert back.task_id == msg.task_id and bytes(back.data) == bytes(msg.data)


def test_unknown_extra_keys_are_ignored():
    fields = {"task_id": TASK, "num": 3, "digest": "aa" * 32, "future_field": [1, 2, 3]}
    back = wire.decode([wire.MAGIC, b"PIECE_REQUEST", msgpack.packb(fields)])
    assert back == wire.PieceRequest(TASK, 3, "aa" * 32)


def test_int_is_accepted_for_float_and_converted():
    fields = {"host_id": "h", "heartbeat_interval_s": 2}
    back = wire.decode([wire.MAGIC, b"HOST_ACK", msgpack.packb(fields)])
    assert back.heartbeat_interval_s == 2.0 and isinstance(back.heartbeat_interval_s, float)


def test_split_routed():
    frames = wire.encode(wire.Heartbeat("x"))
    ident, rest = wire.split_routed([b"\x00id", *frames])
    assert ident == b"\x00id" and wire.decode(rest) == wire.Heartbeat("x")
    with pytest.raises(RemoteProtocolError):
        wire.split_routed([b"id"])


def test_encode_refuses_non_messages_and_unencodable_values():
    with pytest.raises(LocalProtocolError):
        wire.encode(PieceInfo(0, 0, 1, "aa"))  # a record, not a message
    with pytest.raises(LocalProtocolError):
        wire.encode(object())
    with pytest.raises(LocalProtocolError):
        wire.encode(wire.StatReply({"x": object()}))


# -- payload frames --------------------------------------------------------------------------


def test_payload_is_its_own_frame_and_never_packed():
    data = bytes(range(256)) * 4096  # 1 MiB
    msg = wire.PieceData(TASK, 7, "55" * 32, data)
    frames = wire.encode(msg)
    assert len(frames) == 4
    assert frames[3] is data  # handed over uncopied
    assert len(frames[2]) < 200  # the fields frame holds no piece bytes
    assert "data" not in msgpack.unpackb(frames[2])
    back = wire.decode(frames)
    assert back.data is data  # decode does not copy either


@pytest.mark.parametrize("conv", [bytearray, memoryview])
def test_payload_may_be_any_bytes_like(conv):
    data = conv(b"abc" * 1000)
    frames = wire.encode(wire.PieceData(TASK, 0, "66" * 32, data))
    assert frames[3] is data
    assert bytes(wire.decode(frames).data) == b"abc" * 1000


def test_zmq_frame_payload_becomes_a_memoryview():
    frames = wire.encode(wire.PieceData(TASK, 0, "66" * 32, b"xyz"))
    back = wire.decode([*frames[:3], zmq.Frame(b"xyz")])
    assert isinstance(back.data, memoryview) and bytes(back.data) == b"xyz"


@pytest.mark.parametrize("extra", [-1, 1, 2])
def test_wrong_payload_frame_count(extra):
    frames = wire.encode(wire.PieceData(TASK, 0, "66" * 32, b"xyz"))
    frames = frames[:3] if extra < 0 else frames + [b"more"] * extra
    assert_hostile(frames)


def test_payload_frame_on_a_message_without_payloads():
    assert_hostile([*wire.encode(wire.Heartbeat("x")), b"surprise"])


# -- hostile input ---------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [
    [],
    [wire.MAGIC],
    [wire.MAGIC, b"HEARTBEAT"],
    [b"DFZ2", b"HEARTBEAT", msgpack.packb({})],
    [b"", b"HEARTBEAT", msgpack.packb({})],
    [b"DFZ1" * 1000, b"HEARTBEAT", msgpack.packb({})],
    [wire.MAGIC, b"NO_SUCH_KIND", msgpack.packb({})],
    [wire.MAGIC, b"", msgpack.packb({})],
    [wire.MAGIC, b"heartbeat", msgpack.packb({})],  # kinds are case-sensitive
    [wire.MAGIC, b"\xff\xfe" * 100, msgpack.packb({})],
    [wire.MAGIC, b"HEARTBEAT", b""],
    [wire.MAGIC, b"HEARTBEAT", b"\xc1"],  # never-used msgpack byte
    [wire.MAGIC, b"HEARTBEAT", b"\x81"],  # map of one, truncated
    [wire.MAGIC, b"HEARTBEAT", msgpack.packb({}) + b"trailing"],
    [wire.MAGIC, b"HEARTBEAT", msgpack.packb([1, 2, 3])],
    [wire.MAGIC, b"HEARTBEAT", msgpack.packb("a string")],
    [wire.MAGIC, b"HEARTBEAT", msgpack.packb(None)],
    [wire.MAGIC, b"HEARTBEAT", msgpack.packb({"sender": 5})],
    [wire.MAGIC, b"HEARTBEAT", msgpack.packb({"sender": b"bytes"})],
    [wire.MAGIC, b"HEARTBEAT", msgpack.packb({"sender": None})],
    [wire.MAGIC, b"HEARTBEAT", b"\xa3\xff\xfe\xfd"],  # invalid utf-8 string
    [wire.MAGIC, b"HEARTBEAT", msgpack.packb({(1, 2): 3})],  # list as a map key
    [wire.MAGIC, b"HEARTBEAT", b"\x91" * 5000 + b"\xc0"],  # absurdly deep nesting
    [wire.MAGIC, b"HEARTBEAT", b"\xdd\xff\xff\xff\xff"],  # array32 claiming 4G items
    [wire.MAGIC, b"HEARTBEAT", b"\xdb\x7f\xff\xff\xff"],  # str32 claiming 2 GiB
    [wire.MAGIC, b"HEARTBEAT", msgpack.packb({"sender": msgpack.ExtType(5, b"x")})],
], ids=lambda f: repr(f)[:40])
def test_malformed_frames(frames):
    assert_hostile(frames)


@pytest.mark.parametrize("fields", [
    {"task_id": TASK, "peer_id": "p", "pieces": "not a list"},
    {"task_id": TASK, "peer_id": "p", "pieces": [[0, 0, 10]]},  # record too short
    {"task_id": TASK, "peer_id": "p", "pieces": [[0, 0, "ten", "aa"]]},
    {"task_id": TASK, "peer_id": "p", "pieces": [[0, 0, 10, 5]]},
    {"task_id": TASK, "peer_id": "p", "pieces": [[True, 0, 10, "aa"]]},  # bool is not an int
    {"task_id": TASK, "peer_id": "p", "pieces": [[0.5, 0, 10, "aa"]]},
    {"task_id": TASK, "peer_id": "p", "pieces": [{"num": 0}]},
    {"task_id": TASK, "peer_id": "p", "pieces": [None]},
    {"task_id": TASK, "peer_id": "p", "pieces": [[0, 0, 10, "aa"], 7]},
    {"task_id": TASK, "peer_id": "p", "pieces": [], "content_length": "big"},
    {"task_id": 1, "peer_id": "p", "pieces": []},
    {"task_id": TASK, "peer_id": ["p"], "pieces": []},
], ids=range(12))
def test_wrong_types_nested_inside_records(fields):
    assert_hostile([wire.MAGIC, b"PIECE_REPORT", msgpack.packb(fields)])


@pytest.mark.parametrize("kind,fields", [
    (b"PEER_PARENTS", {"task_id": TASK, "peer_id": "p", "parents": [["p", "h", 5]]}),
    (b"PEER_PARENTS", {"task_id": TASK, "peer_id": "p", "parents": [["p", "h", "a", "yes"]]}),
    (b"SCHEDULER_LIST", {"schedulers": [["id", "scheduler"]]}),
    (b"SCHEDULER_LIST", {"schedulers": [], "seeds": [["id", "seed", "addr", 1]]}),
    (b"CLUSTER_UPDATE", {"seq": 1, "member": "sched-1"}),
    (b"CLUSTER_UPDATE", {"seq": "1", "member": ["m", "scheduler", "tcp://x"]}),
    (b"PEER_REGISTER", {"task_id": TASK, "peer_id": "p", "url": "u", "headers": {"a": 1}}),
    (b"PEER_REGISTER", {"task_id": TASK, "peer_id": "p", "url": "u", "headers": {1: "a"}}),
    (b"PEER_REGISTER", {"task_id": TASK, "peer_id": "p", "url": "u", "headers": ["a", "b"]}),
    (b"HAVE", {"task_id": TASK, "nums": [1, "2"]}),
    (b"HAVE", {"task_id": TASK, "nums": [1, 2], "complete": 1}),
    (b"MEMBER_WELCOME", {"cluster_id": "c", "heartbeat_interval_s": True}),
    (b"MEMBER_WELCOME", {"cluster_id": "c", "heartbeat_interval_s": 1.0, "config": []}),
    (b"EVENT", {"seq": 1, "name": "x", "fields": {5: "x"}}),
    (b"STAT_REPLY", {"info": None}),
])
def test_wrong_types_in_other_messages(kind, fields):
    assert_hostile([wire.MAGIC, kind, msgpack.packb(fields)])


@pytest.mark.parametrize("cls", [c for c in ALL if any(wire._required(f) for _, tp, f in c._fields
                                                       if tp is not wire.Payload)],
                         ids=lambda c: c.KIND.decode())
def test_missing_required_fields(cls):
    frames = wire.encode(build(cls))
    full = msgpack.unpackb(frames[2])
    for name, tp, f in cls._fields:
        if tp is wire.Payload or not wire._required(f):
            continue
        fields = {k: v for k, v in full.items() if k != name}
        assert_hostile([frames[0], frames[1], msgpack.packb(fields), *frames[3:]])


def test_too_long_strings():
    assert_hostile([wire.MAGIC, b"HEARTBEAT", msgpack.packb({"sender": "x" * (wire.MAX_STR + 1)})])
    # multi-byte characters: within msgpack's byte limit is still checked per field
    assert wire.decode([wire.MAGIC, b"HEARTBEAT", msgpack.packb({"sender": "x" * wire.MAX_STR})])
    assert_hostile([wire.MAGIC, b"ERROR", msgpack.packb({"code": "c", "detail": "é" * (wire.MAX_STR // 2 + 1)})])
    assert_hostile([wire.MAGIC, b"PEER_REGISTER", msgpack.packb(
        {"task_id": TASK, "peer_id": "p", "url": "u", "headers": {"h" * (wire.MAX_STR + 1): "v"}})])


def test_too_long_lists():
    nums = [0] * (wire.MAX_LIST + 1)
    assert_hostile([wire.MAGIC, b"HAVE", msgpack.packb({"task_id": TASK, "nums": nums})])


def test_fields_frame_too_large():
    big = msgpack.packb({"sender": "x"}) + b"\x00" * (wire.MAX_FIELDS_BYTES + 1)
    assert_hostile([wire.MAGIC, b"HEARTBEAT", big])


def test_fuzz_random_frames():
    """Pure noise: random frame counts and bytes, with the real magic and kinds mixed in."""
    rng = random.Random(1234)
    kinds = list(wire.REGISTRY)
    for _ in range(3000):
        n = rng.randrange(0, 7)
        frames = [rng.randbytes(rng.randrange(0, 40)) for _ in range(n)]
        if n >= 1 and rng.random() < 0.7:
            frames[0] = wire.MAGIC
        if n >= 2 and rng.random() < 0.7:
            frames[1] = rng.choice(kinds)
        msg = decode_or_protocol_error(frames)
        # Noise that happens to be valid must at least be the message its kind frame names.
        assert msg is None or type(msg) is wire.REGISTRY[bytes(frames[1])]


def test_fuzz_mutated_valid_messages():
    """Valid encodings of every message with bytes flipped, cut, inserted or fields swapped."""
    rng = random.Random(99)
    for i in range(4000):
        frames = list(rng.choice(VALID))
        packed = bytearray(frames[2])
        op = i % 5
        if op == 0 and packed:
            for _ in range(rng.randrange(1, 4)):
                packed[rng.randrange(len(packed))] = rng.randrange(256)
        elif op == 1:
            packed = packed[: rng.randrange(len(packed) + 1)]
        elif op == 2:
            at = rng.randrange(len(packed) + 1)
            packed[at:at] = rng.randbytes(rng.randrange(1, 8))
        elif op == 3:
            frames[1] = rng.choice(list(wire.REGISTRY))  # fields of one kind under another
        else:
            fields = msgpack.unpackb(bytes(packed))
            if fields:
                key = rng.choice(list(fields))
                fields[key] = rng.choice([None, 1, -1, 2**63, 1.5, True, "s", b"b", [], {}, [[1]],
                                          {"a": [None]}, [["x", 1, 2, 3]]])
            packed = bytearray(msgpack.packb(fields, use_bin_type=True))
        frames[2] = bytes(packed)
        msg = decode_or_protocol_error(frames)
        assert msg is None or type(msg) is wire.REGISTRY[frames[1]]
