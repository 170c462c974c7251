"""The wire protocol: every message kind round-trips; every malformed frame list is a typed WireError."""

from __future__ import annotations

import json
from typing import Any

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from common.wire import (
    MAX_HEADER_BYTES,
    MAX_IDS_PER_REQUEST,
    PROTOCOL_VERSION,
    AckMsg,
    ErrorCode,
    ErrorMsg,
    Kind,
    LeaseGrantMsg,
    LeaseRequestMsg,
    SampledTreeInfo,
    SampleReplyMsg,
    SampleRequestMsg,
    StatsReplyMsg,
    StatsRequestMsg,
    StoreReference,
    SubtreeMsg,
    VersionMsg,
    WeightsAnnounceMsg,
    WeightsChunkMsg,
    WeightsFetchMsg,
    WireError,
    decode_message,
    encode_message,
    split_routed,
)

LIMIT = 1 << 20


def info(tree_id: str, n_messages: int) -> SampledTreeInfo:
    return SampledTreeInfo(
        tree_id=tree_id,
        task_id="task",
        actor_id="actor-0",
        n_messages=n_messages,
        min_version=3,
        max_version=None,
        staleness=1,
        times_sampled=0,
    )


# One example of every kind, with the blobs it must carry.
EXAMPLES: list[tuple[Any, list[bytes]]] = [
    (SubtreeMsg(req=1), [b"\xff\x00arrow bytes"]),
    (AckMsg(req=2, tree_id="t-1", seq=4, duplicate=True), []),
    (AckMsg(), []),
    (LeaseRequestMsg(req=3, actor_id="actor-0", n=2, renew=["t-1", "t-2"]), []),
    (
        LeaseGrantMsg(
            req=4, tree_ids=["t-3"], learner_version=7, lease_ttl_s=30.5, renewed=["t-1"], lost=["t-2"], reason="x"
        ),
        [],
    ),
    (SampleRequestMsg(req=5, request_id="r-1", n=2, learner_version=7), []),
    (SampleReplyMsg(req=6, request_id="r-1", ready=True, trees=[info("a", 2), info("b", 1)]), [b"a0", b"a1", b"b0"]),
    (SampleReplyMsg(req=6, request_id="r-1", ready=False, reason="not enough trees"), []),
    (SampleRequestMsg(req=5, request_id="r-2", n=1, learner_version=7, by_reference=True), []),
    (
        SampleReplyMsg(
            req=6,
            request_id="r-2",
            ready=True,
            trees=[info("a", 2).model_copy(update={"keys": ["00aa", "00ab"]})],
            store=StoreReference(path="/runs/replay", store_id="0f" * 16, db="subtrees"),
        ),
        [],
    ),
    (VersionMsg(req=7, version=12), []),
    (StatsRequestMsg(req=8), []),
    (StatsReplyMsg(req=9, stats={"trees": 3, "nested": {"a": [1, 2.5, None, "é"]}, "ok": True}), []),
    (ErrorMsg(req=2**63 - 1, code=ErrorCode.BAD_SUBTREE, message="schema mismatch"), []),
    (ErrorMsg(req=-1, code=ErrorCode.INTERNAL, message=""), []),
    (
        WeightsAnnounceMsg(
            version=3, total_bytes=10, chunk_bytes=4096, n_chunks=1, sha256="ab" * 32, format="safetensors"
        ),
        [],
    ),
    (WeightsFetchMsg(req=10, version=3, chunk=0), []),
    (WeightsChunkMsg(req=10, version=3, chunk=0, sha256="cd" * 32), [b"0123456789"]),
]


def header(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def refused(frames: list[Any], code: ErrorCode, req: int = -1, limit: int = LIMIT) -> WireError:
    with pytest.raises(WireError) as info_:
        decode_message(frames, limit)
    error = info_.value
    assert error.code is code, str(error)
    assert error.req == req, str(error)
    assert str(error).startswith(f"{code.value}: ")
    return error


# ----------------------------------------------------------------------------------------- round trips


def test_examples_cover_every_kind() -> None:
    assert {message.kind for message, _ in EXAMPLES} == set(Kind)


@pytest.mark.parametrize(("message", "blobs"), EXAMPLES, ids=[f"{m.kind}-{i}" for i, (m, _) in enumerate(EXAMPLES)])
def test_round_trip(message: Any, blobs: list[bytes]) -> None:
    frames = encode_message(message, blobs)
    assert len(frames) == 1 + len(blobs)
    assert frames[1:] == blobs
    head = json.loads(frames[0])
    assert head["proto"] == PROTOCOL_VERSION
    assert head["kind"] == message.kind.value
    decoded, got_blobs = decode_message(frames, LIMIT)
    assert type(decoded) is type(message)
    assert decoded == message
    assert got_blobs == blobs
    # Frames as memoryviews and as pyzmq Frames decode the same way.
    decoded_views, _ = decode_message([memoryview(f) for f in frames], LIMIT)
    assert decoded_views == message
    decoded_zmq, zmq_blobs = decode_message([zmq.Frame(f) for f in frames], LIMIT)
    assert decoded_zmq == message
    assert [bytes(b.bytes) for b in zmq_blobs] == blobs


def test_encode_refuses_a_wrong_blob_count() -> None:
    with pytest.raises(WireError) as error:
        encode_message(SubtreeMsg(), [])
    assert error.value.code is ErrorCode.MALFORMED
    with pytest.raises(WireError):
        encode_message(VersionMsg(version=1), [b"x"])
    with pytest.raises(WireError):
        encode_message(SampleReplyMsg(request_id="r", ready=True, trees=[info("a", 2)]), [b"a0"])


def _reply_header(**changes: Any) -> bytes:
    header = {
        "proto": PROTOCOL_VERSION,
        "kind": "sample_reply",
        "req": 1,
        "request_id": "r",
        "ready": True,
        "trees": [{**info("a", 2).model_dump(), "keys": ["01", "02"]}],
        "store": {"path": "/runs/replay", "store_id": "ab", "db": "subtrees"},
    }
    header.update(changes)
    return json.dumps(header).encode()


@pytest.mark.parametrize(
    "changes",
    [
        {"store": None},  # keys without the store they index
        {"trees": [info("a", 2).model_dump()]},  # the store, but a tree without keys
        {"trees": [{**info("a", 2).model_dump(), "keys": ["01"]}]},  # fewer keys than messages
        {"trees": [{**info("a", 2).model_dump(), "keys": ["01", "zz"]}]},  # not hex
        {"trees": [{**info("a", 2).model_dump(), "keys": ["01", "0" * 300]}]},  # too long
        {"store": {"path": "", "store_id": "ab", "db": "subtrees"}},
    ],
)
def test_a_sample_reply_by_reference_must_name_its_store_and_every_key(changes: dict[str, Any]) -> None:
    with pytest.raises(WireError) as error:
        decode_message([_reply_header(**changes)], LIMIT)
    assert error.value.code is ErrorCode.MALFORMED


def test_a_sample_reply_by_reference_carries_no_blobs() -> None:
    message, blobs = decode_message([_reply_header()], LIMIT)
    assert isinstance(message, SampleReplyMsg) and message.store is not None and blobs == []
    with pytest.raises(WireError):
        decode_message([_reply_header(), b"a0", b"a1"], LIMIT)


def test_split_routed() -> None:
    identity, frames = split_routed([b"peer", b"{}", b"blob"])
    assert identity == b"peer"
    assert frames == [b"{}", b"blob"]
    identity, frames = split_routed([zmq.Frame(b"peer"), b"{}"])
    assert identity == b"peer"
    assert frames == [b"{}"]
    for bad in ([], [b"peer"]):
        with pytest.raises(WireError) as error:
            split_routed(bad)
        assert error.value.code is ErrorCode.MALFORMED


# ----------------------------------------------------------------------------------------- refusals


def test_empty_frames() -> None:
    refused([], ErrorCode.MALFORMED)
    refused([b""], ErrorCode.MALFORMED)
    refused([memoryview(b"")], ErrorCode.MALFORMED)


@pytest.mark.parametrize(
    "head",
    [b"{", b"not json", b"\xff\xfe\x00", b"{'proto': 1}", b'{"proto": 1,}', b"\xc3\x28", b"[" * 100_000, b"1" * 5000],
    ids=["open", "text", "bytes", "single-quotes", "trailing-comma", "bad-utf8", "deep-nesting", "huge-int"],
)
def test_non_json_header(head: bytes) -> None:
    refused([head], ErrorCode.MALFORMED)


def test_deeply_nested_field_value_is_malformed() -> None:
    head = b'{"proto": 1, "kind": "stats_reply", "req": 5, "stats": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    refused([head], ErrorCode.MALFORMED)  # req could not be read: the JSON never parsed


@pytest.mark.parametrize("head", [b"[]", b"1", b'"subtree"', b"null", b"true", b'[{"proto": 1}]'])
def test_json_non_object_header(head: bytes) -> None:
    error = refused([head], ErrorCode.MALFORMED)
    assert "object" in error.detail


@pytest.mark.parametrize("proto", [2, 0, "1", None, [1], {"v": 1}, 1.5])
def test_wrong_protocol(proto: Any) -> None:
    error = refused([header(proto=proto, kind="version", version=1, req=11)], ErrorCode.UNSUPPORTED_PROTOCOL, 11)
    assert repr(proto) in error.detail


def test_missing_protocol() -> None:
    refused([header(kind="version", version=1, req=12)], ErrorCode.UNSUPPORTED_PROTOCOL, 12)


@pytest.mark.parametrize("kind", ["bogus", "SUBTREE", "", None, 3, ["subtree"], {"k": "subtree"}])
def test_unknown_kind(kind: Any) -> None:
    refused([header(proto=1, kind=kind, req=13)], ErrorCode.UNKNOWN_KIND, 13)


def test_missing_kind() -> None:
    refused([header(proto=1, req=14)], ErrorCode.UNKNOWN_KIND, 14)


BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"kind": "version", "version": "abc"}, "version"),
    ({"kind": "version", "version": -1}, "version"),
    ({"kind": "version", "version": 1.5}, "version"),
    ({"kind": "version"}, "version"),
    ({"kind": "version", "version": [1]}, "version"),
    ({"kind": "ack", "tree_id": 5}, "tree_id"),
    ({"kind": "ack", "seq": "first"}, "seq"),
    ({"kind": "lease_request", "actor_id": "", "n": 1}, "actor_id"),
    ({"kind": "lease_request", "actor_id": 7, "n": 1}, "actor_id"),
    ({"kind": "lease_request", "actor_id": "a" * 257, "n": 1}, "actor_id"),
    ({"kind": "lease_request", "actor_id": "a", "n": -1}, "n"),
    ({"kind": "lease_request", "actor_id": "a", "n": MAX_IDS_PER_REQUEST + 1}, "n"),
    ({"kind": "lease_request", "actor_id": "a", "n": 1, "renew": "t-1"}, "renew"),
    ({"kind": "lease_request", "actor_id": "a", "n": 1, "renew": [""]}, "renew"),
    ({"kind": "lease_request", "actor_id": "a", "n": 1, "renew": ["t"] * (MAX_IDS_PER_REQUEST + 1)}, "renew"),
    ({"kind": "lease_grant", "tree_ids": [1], "learner_version": 0, "lease_ttl_s": 1.0}, "tree_ids"),
    ({"kind": "lease_grant", "tree_ids": [], "learner_version": 0, "lease_ttl_s": "soon"}, "lease_ttl_s"),
    ({"kind": "sample_request", "request_id": "r", "n": 0, "learner_version": 0}, "n"),
    ({"kind": "sample_request", "request_id": "", "n": 1, "learner_version": 0}, "request_id"),
    ({"kind": "sample_request", "request_id": "r", "n": 1, "learner_version": -3}, "learner_version"),
    ({"kind": "sample_reply", "request_id": "r", "ready": "maybe"}, "ready"),
    ({"kind": "sample_reply", "request_id": "r", "ready": True, "trees": [{"tree_id": "a"}]}, "trees"),
    ({"kind": "sample_reply", "request_id": "r", "ready": True, "trees": {"a": 1}}, "trees"),
    ({"kind": "stats_reply", "stats": [1, 2]}, "stats"),
    ({"kind": "stats_reply"}, "stats"),
    ({"kind": "error", "code": "no_such_code", "message": "m"}, "code"),
    ({"kind": "error", "code": "internal"}, "message"),
]


@pytest.mark.parametrize(("fields", "name"), BAD_FIELDS)
def test_bad_field_types(fields: dict[str, Any], name: str) -> None:
    error = refused([header(proto=1, req=21, **fields)], ErrorCode.MALFORMED, 21)
    assert name in error.detail
    assert fields["kind"] in error.detail


def test_bad_req_is_malformed_and_not_carried() -> None:
    for req in (-2, 2**63, "five", 1.5, None, [1], {"r": 1}):
        refused([header(proto=1, kind="stats_request", req=req)], ErrorCode.MALFORMED, -1)


def test_req_defaults() -> None:
    message, _ = decode_message([header(proto=1, kind="stats_request")], LIMIT)
    assert message.req == 0
    refused([header(proto=2, kind="stats_request")], ErrorCode.UNSUPPORTED_PROTOCOL, -1)


@pytest.mark.parametrize(
    "extra",
    [{"surprise": 1}, {"blobs": 1}, {"kind2": "ack"}],
)
def test_extra_fields(extra: dict[str, Any]) -> None:
    error = refused([header(proto=1, kind="version", version=1, req=22, **extra)], ErrorCode.MALFORMED, 22)
    assert next(iter(extra)) in error.detail


def test_extra_field_in_nested_tree_info() -> None:
    tree = {**info("a", 1).model_dump(), "extra": True}
    head = header(proto=1, kind="sample_reply", req=23, request_id="r", ready=True, trees=[tree])
    refused([head, b"blob"], ErrorCode.MALFORMED, 23)


@pytest.mark.parametrize(
    ("fields", "blobs"),
    [
        ({"kind": "subtree"}, 0),
        ({"kind": "subtree"}, 2),
        ({"kind": "ack"}, 1),
        ({"kind": "version", "version": 1}, 3),
        ({"kind": "stats_request"}, 1),
        ({"kind": "sample_reply", "request_id": "r", "ready": False}, 1),
        ({"kind": "sample_reply", "request_id": "r", "ready": True, "trees": [info("a", 2).model_dump()]}, 1),
        ({"kind": "sample_reply", "request_id": "r", "ready": True, "trees": [info("a", 2).model_dump()]}, 3),
    ],
)
def test_wrong_blob_counts(fields: dict[str, Any], blobs: int) -> None:
    error = refused([header(proto=1, req=31, **fields), *[b"blob"] * blobs], ErrorCode.MALFORMED, 31)
    assert f"got {blobs}" in error.detail


def test_oversized_total_is_refused_before_parsing() -> None:
    frames = encode_message(SubtreeMsg(req=41), [b"x" * 1000])
    total = sum(len(f) for f in frames)
    decode_message(frames, total)  # exactly at the limit: fine
    error = refused(frames, ErrorCode.OVERSIZED, -1, limit=total - 1)
    assert str(total) in error.detail
    # The size check comes before parsing: an oversized non-JSON message is OVERSIZED, not MALFORMED.
    refused([b"\xff" * 100], ErrorCode.OVERSIZED, -1, limit=99)
    refused([memoryview(b"{}"), memoryview(b"x" * 100)], ErrorCode.OVERSIZED, -1, limit=50)


def test_oversized_header_frame() -> None:
    head = header(proto=1, kind="stats_reply", req=1, stats={"pad": "x" * MAX_HEADER_BYTES})
    refused([head], ErrorCode.OVERSIZED, -1, limit=4 * MAX_HEADER_BYTES)


def test_wire_error_fields() -> None:
    error = WireError(ErrorCode.BAD_SUBTREE, "details", req=9)
    assert isinstance(error, ValueError)
    assert (error.code, error.detail, error.req) == (ErrorCode.BAD_SUBTREE, "details", 9)
    assert str(error) == "bad_subtree: details"
    assert WireError(ErrorCode.INTERNAL, "x").req == -1


# ----------------------------------------------------------------------------------------- fuzz

MODELS = (AckMsg, LeaseRequestMsg, LeaseGrantMsg, SampleRequestMsg, SampleReplyMsg, VersionMsg, StatsReplyMsg, ErrorMsg)
FIELD_NAMES = sorted({name for model in MODELS for name in model.model_fields} | set(SampledTreeInfo.model_fields))
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
field_values = st.one_of(
    json_values,
    st.sampled_from([*list(Kind), 1, 0, -1, "r"]),
    st.lists(st.text(min_size=1, max_size=4), max_size=3),
    st.lists(st.fixed_dictionaries({k: json_values for k in SampledTreeInfo.model_fields}), max_size=2),
    st.lists(st.builds(lambda n: {**info("t", 1).model_dump(), "n_messages": n}, st.integers(0, 3)), max_size=3),
)


@st.composite
def headers_(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-addressed headers (proto 1, a real kind, a req) with random fields; sometimes not."""
    head: dict[str, Any] = {
        "proto": 1,
        "kind": draw(st.sampled_from(Kind)).value,
        "req": draw(st.one_of(st.integers(-3, 2**63 + 1), field_values)),
    }
    head.update(draw(st.dictionaries(st.sampled_from(FIELD_NAMES), field_values, max_size=6)))
    for key in draw(st.lists(st.sampled_from(["proto", "kind", "req"]), max_size=2)):
        head.pop(key, None)
    return head


def _check_outcome(frames: list[Any]) -> tuple[Any, list[Any]] | WireError:
    try:
        message, blobs = decode_message(frames, LIMIT)
    except WireError as error:
        assert isinstance(error.code, ErrorCode)
        assert isinstance(error.req, int)
        assert -1 <= error.req < 2**63
        return error
    assert message.proto == PROTOCOL_VERSION
    assert blobs == list(frames[1:])
    # Whatever decodes re-encodes and decodes to the same message.
    again, again_blobs = decode_message(encode_message(message, blobs), LIMIT)
    assert again == message
    assert again_blobs == blobs
    return message, blobs


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_fuzz_arbitrary_frames(frames: list[bytes]) -> None:
    _check_outcome(frames)


@settings(max_examples=300, deadline=None)
@given(headers_(), st.integers(0, 4))
def test_fuzz_json_headers(head: dict[str, Any], n_blobs: int) -> None:
    frames = [json.dumps(head).encode(), *[b"blob"] * n_blobs]
    outcome = _check_outcome(frames)
    req = head.get("req", -1)
    readable = isinstance(req, int) and not isinstance(req, bool) and -1 <= req < 2**63
    if isinstance(outcome, WireError):
        # Every header here is a JSON object within the size limit: req travels back whenever it was readable.
        assert outcome.req == (req if readable else -1)
    else:
        message, _ = outcome
        # pydantic validates in lax mode, so e.g. "7" or true may be accepted as a req; never out of range.
        assert -1 <= message.req < 2**63
        if "req" not in head:
            assert message.req == 0  # (while an error about the same header would carry -1)
        elif readable:
            assert message.req == req


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(EXAMPLES), st.data())
def test_fuzz_mutated_valid_headers(example: tuple[Any, list[bytes]], data: st.DataObject) -> None:
    message, blobs = example
    head = json.loads(encode_message(message, blobs)[0])
    action = data.draw(st.sampled_from(["drop", "set", "add"]))
    if action == "drop" and head:
        head.pop(data.draw(st.sampled_from(sorted(head))))
    elif action == "set":
        head[data.draw(st.sampled_from(sorted(head)))] = data.draw(field_values)
    else:
        head[data.draw(st.sampled_from(FIELD_NAMES))] = data.draw(field_values)
    n_blobs = data.draw(st.sampled_from([len(blobs), 0, 1, 3]))
    outcome = _check_outcome([json.dumps(head).encode(), *[b"b"] * n_blobs])
    if isinstance(outcome, WireError):
        req = head.get("req", -1)
        readable = isinstance(req, int) and not isinstance(req, bool) and -1 <= req < 2**63
        assert outcome.req == (req if readable else -1)
