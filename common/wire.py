"""The wire protocol: message kinds, multipart framing, size limits. JSON and Arrow only, no pickle.

Framing (decided here): a message is a ZeroMQ multipart message whose first frame is a UTF-8 JSON
object (the header: `proto`, `kind`, `req` plus the kind's fields) and whose further frames are
binary blobs (Arrow subtree messages, weight chunks). A ROUTER socket sees the peer identity frame
in front of these; `split_routed` removes it.

- `req` is the sender's correlation number; replies carry it back so that clients match replies to
  requests and drop late ones.
- Blob counts are part of the contract: a subtree and a weights chunk have exactly one blob, a
  sample reply one blob per stored message of each tree it lists, everything else none.
- A sample by reference (`SampleRequestMsg.by_reference`, for a learner on the replay's host) is
  answered with no blobs: the reply names the store (`StoreReference`: its LMDB directory, the id
  written into it at creation, the named database) and each tree's subtree keys in seq order (hex),
  and the learner reads the bytes from the LMDB map itself (`common.store_reader`). Replay keeps a
  tree handed out this way from eviction for `replay.reference_hold_s`, so the keys stay readable.
- A message larger than `max_message_bytes` (all frames together) is refused before it is parsed.

Errors are typed (`WireError` with an `ErrorCode`), so a service can reply with the code and count it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
MAX_IDS_PER_REQUEST = 4096

Frame = bytes | memoryview


class Kind(StrEnum):
    SUBTREE = "subtree"
    ACK = "ack"
    LEASE_REQUEST = "lease_request"
    LEASE_GRANT = "lease_grant"
    SAMPLE_REQUEST = "sample_request"
    SAMPLE_REPLY = "sample_reply"
    VERSION = "version"
    STATS_REQUEST = "stats_request"
    STATS_REPLY = "stats_reply"
    ERROR = "error"
    WEIGHTS_ANNOUNCE = "weights_announce"
    WEIGHTS_FETCH = "weights_fetch"
    WEIGHTS_CHUNK = "weights_chunk"


class ErrorCode(StrEnum):
    MALFORMED = "malformed"
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    UNKNOWN_KIND = "unknown_kind"
    OVERSIZED = "oversized"
    BAD_SUBTREE = "bad_subtree"
    UNKNOWN_TREE = "unknown_tree"
    LEASE_EXPIRED = "lease_expired"
    TREE_COMPLETE = "tree_complete"
    REJECTED_TREE = "rejected_tree"
    BAD_REQUEST = "bad_request"
    UNKNOWN_VERSION = "unknown_version"
    INTERNAL = "internal"


class WireError(ValueError):
    """A message that cannot be accepted; `code` is what goes back to the sender."""

    def __init__(self, code: ErrorCode, message: str, req: int = -1) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.detail = message
        self.req = req


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    proto: Literal[1] = PROTOCOL_VERSION
    req: int = Field(0, ge=-1, lt=2**63)


class SubtreeMsg(_Message):
    """Actor -> replay: one Arrow subtree (its identity travels in the Arrow metadata)."""

    kind: Literal[Kind.SUBTREE] = Kind.SUBTREE


class AckMsg(_Message):
    """Replay -> client: the request is durable (subtrees: committed to LMDB)."""

    kind: Literal[Kind.ACK] = Kind.ACK
    tree_id: str | None = None
    seq: int | None = None
    duplicate: bool = False


TreeIdList = Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=MAX_IDS_PER_REQUEST)]


class LeaseRequestMsg(_Message):
    """Actor -> replay: ask to start `n` new trees and keep the listed growing trees alive."""

    kind: Literal[Kind.LEASE_REQUEST] = Kind.LEASE_REQUEST
    actor_id: str = Field(min_length=1, max_length=256)
    n: int = Field(ge=0, le=MAX_IDS_PER_REQUEST)
    renew: TreeIdList = Field(default_factory=list)
    # True on a client's first request: a (re)started actor holds no growing trees of its id beyond
    # `renew`, so replay drops the others now instead of when their leases run out.
    release_others: bool = False
    # Makes the request idempotent: replay answers a request id this actor used before with the trees
    # it granted the first time (still growing), granting and releasing nothing new. None: not idempotent.
    request_id: str | None = Field(None, min_length=1, max_length=128)


class LeaseGrantMsg(_Message):
    """Replay -> actor: tree ids it may start now (possibly fewer than asked, with the reason)."""

    kind: Literal[Kind.LEASE_GRANT] = Kind.LEASE_GRANT
    tree_ids: list[str]
    learner_version: int
    lease_ttl_s: float
    renewed: list[str] = Field(default_factory=list)
    lost: list[str] = Field(default_factory=list)
    reason: str = ""


class SampleRequestMsg(_Message):
    """Learner -> replay: `n` completed trees for training at `learner_version`.

    `request_id` makes the request idempotent: a retry with the same id gets the same trees.
    """

    kind: Literal[Kind.SAMPLE_REQUEST] = Kind.SAMPLE_REQUEST
    request_id: str = Field(min_length=1, max_length=128)
    n: int = Field(ge=1, le=MAX_IDS_PER_REQUEST)
    learner_version: int = Field(ge=0)
    by_reference: bool = False


MAX_KEY_HEX = 256  # a subtree key as hex: replay's keys are 16 bytes


class StoreReference(BaseModel):
    """Where a sample by reference lies: the replay store's LMDB directory on the replay's host."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(min_length=1, max_length=4096)
    store_id: str = Field(min_length=1, max_length=128)
    db: str = Field(min_length=1, max_length=64)


class SampledTreeInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tree_id: str
    task_id: str
    actor_id: str
    n_messages: int = Field(ge=1)
    min_version: int | None
    max_version: int | None
    staleness: int | None
    times_sampled: int
    keys: list[Annotated[str, Field(min_length=1, max_length=MAX_KEY_HEX, pattern="^[0-9a-f]+$")]] | None = None


class SampleReplyMsg(_Message):
    """Replay -> learner: either `ready` with trees (blobs in order, or keys into `store`), or not ready."""

    kind: Literal[Kind.SAMPLE_REPLY] = Kind.SAMPLE_REPLY
    request_id: str
    ready: bool
    reason: str = ""
    trees: list[SampledTreeInfo] = Field(default_factory=list)
    store: StoreReference | None = None

    @model_validator(mode="after")
    def _keys_match_store(self) -> SampleReplyMsg:
        for tree in self.trees:
            if (tree.keys is None) != (self.store is None):
                raise ValueError("a reply by reference gives every tree's keys and the store; by value, neither")
            if tree.keys is not None and len(tree.keys) != tree.n_messages:
                raise ValueError(f"tree {tree.tree_id}: {len(tree.keys)} keys for {tree.n_messages} messages")
        return self


class VersionMsg(_Message):
    """Learner -> replay: the learner's weights are now at `version` (acked)."""

    kind: Literal[Kind.VERSION] = Kind.VERSION
    version: int = Field(ge=0)


class StatsRequestMsg(_Message):
    kind: Literal[Kind.STATS_REQUEST] = Kind.STATS_REQUEST


class StatsReplyMsg(_Message):
    kind: Literal[Kind.STATS_REPLY] = Kind.STATS_REPLY
    stats: dict[str, Any]


Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class WeightsAnnounceMsg(_Message):
    """Learner -> actors (PUB): weights `version` can be fetched as `n_chunks` chunks of one blob."""

    kind: Literal[Kind.WEIGHTS_ANNOUNCE] = Kind.WEIGHTS_ANNOUNCE
    version: int = Field(ge=0)
    total_bytes: int = Field(ge=0)
    chunk_bytes: int = Field(gt=0)
    n_chunks: int = Field(ge=0)
    sha256: Sha256Hex
    format: str = Field(min_length=1, max_length=64)


class WeightsFetchMsg(_Message):
    """Actor -> learner: send chunk `chunk` of weights `version`."""

    kind: Literal[Kind.WEIGHTS_FETCH] = Kind.WEIGHTS_FETCH
    version: int = Field(ge=0)
    chunk: int = Field(ge=0)


class WeightsChunkMsg(_Message):
    """Learner -> actor: one chunk (one blob) with its own checksum."""

    kind: Literal[Kind.WEIGHTS_CHUNK] = Kind.WEIGHTS_CHUNK
    version: int = Field(ge=0)
    chunk: int = Field(ge=0)
    sha256: Sha256Hex


class ErrorMsg(_Message):
    kind: Literal[Kind.ERROR] = Kind.ERROR
    code: ErrorCode
    message: str


WireMessage = (
    SubtreeMsg
    | AckMsg
    | LeaseRequestMsg
    | LeaseGrantMsg
    | SampleRequestMsg
    | SampleReplyMsg
    | VersionMsg
    | StatsRequestMsg
    | StatsReplyMsg
    | ErrorMsg
    | WeightsAnnounceMsg
    | WeightsFetchMsg
    | WeightsChunkMsg
)
_MODELS: dict[str, type[_Message]] = {
    Kind.SUBTREE: SubtreeMsg,
    Kind.ACK: AckMsg,
    Kind.LEASE_REQUEST: LeaseRequestMsg,
    Kind.LEASE_GRANT: LeaseGrantMsg,
    Kind.SAMPLE_REQUEST: SampleRequestMsg,
    Kind.SAMPLE_REPLY: SampleReplyMsg,
    Kind.VERSION: VersionMsg,
    Kind.STATS_REQUEST: StatsRequestMsg,
    Kind.STATS_REPLY: StatsReplyMsg,
    Kind.ERROR: ErrorMsg,
    Kind.WEIGHTS_ANNOUNCE: WeightsAnnounceMsg,
    Kind.WEIGHTS_FETCH: WeightsFetchMsg,
    Kind.WEIGHTS_CHUNK: WeightsChunkMsg,
}


def _expected_blobs(message: _Message) -> int:
    if isinstance(message, SubtreeMsg | WeightsChunkMsg):
        return 1
    if isinstance(message, SampleReplyMsg):
        return 0 if message.store is not None else sum(tree.n_messages for tree in message.trees)
    return 0


def encode_message(message: _Message, blobs: Sequence[Frame] = ()) -> list[Frame]:
    """Frames of one message: the JSON header, then the blobs."""
    expected = _expected_blobs(message)
    if len(blobs) != expected:
        raise WireError(ErrorCode.MALFORMED, f"{message.kind} carries {expected} blob(s), got {len(blobs)}")
    return [message.model_dump_json().encode("utf-8"), *blobs]


def _frame_size(frame: Any) -> int:
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)


def decode_message(frames: Sequence[Any], max_message_bytes: int) -> tuple[WireMessage, list[Any]]:
    """Validate frames (size, JSON, kind, fields, blob count) into a message and its blobs."""
    if not frames:
        raise WireError(ErrorCode.MALFORMED, "empty message")
    total = sum(_frame_size(f) for f in frames)
    if total > max_message_bytes:
        raise WireError(ErrorCode.OVERSIZED, f"message of {total} bytes exceeds the limit of {max_message_bytes}")
    head = frames[0]
    head_bytes = head.bytes if hasattr(head, "bytes") else bytes(head)
    if len(head_bytes) > MAX_HEADER_BYTES:
        raise WireError(ErrorCode.OVERSIZED, f"header of {len(head_bytes)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = json.loads(head_bytes)
    except (ValueError, RecursionError) as error:
        # ValueError covers JSONDecodeError, UnicodeDecodeError and over-long integer literals;
        # RecursionError comes from deeply nested arrays/objects.
        raise WireError(ErrorCode.MALFORMED, f"header is not UTF-8 JSON: {type(error).__name__}: {error}") from None
    if not isinstance(header, dict):
        raise WireError(ErrorCode.MALFORMED, "header must be a JSON object")
    req = header.get("req", -1)
    req = req if isinstance(req, int) and not isinstance(req, bool) and -1 <= req < 2**63 else -1
    if header.get("proto") != PROTOCOL_VERSION:
        raise WireError(
            ErrorCode.UNSUPPORTED_PROTOCOL,
            f"protocol {header.get('proto')!r} is not supported (this build speaks {PROTOCOL_VERSION})",
            req,
        )
    kind = header.get("kind")
    model = _MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise WireError(ErrorCode.UNKNOWN_KIND, f"unknown message kind {kind!r}", req)
    try:
        message = model.model_validate(header)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        raise WireError(ErrorCode.MALFORMED, f"bad {kind} header: {problems}", req) from None
    blobs = list(frames[1:])
    expected = _expected_blobs(message)
    if len(blobs) != expected:
        raise WireError(ErrorCode.MALFORMED, f"{kind} carries {expected} blob(s), got {len(blobs)}", req)
    return message, blobs  # type: ignore[return-value]


def split_routed(frames: Sequence[Any]) -> tuple[bytes, list[Any]]:
    """Split a ROUTER socket's frames into the peer identity and the message frames."""
    if len(frames) < 2:
        raise WireError(ErrorCode.MALFORMED, "routed message without a body")
    identity = frames[0]
    return (identity.bytes if hasattr(identity, "bytes") else bytes(identity)), list(frames[1:])
