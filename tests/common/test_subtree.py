"""Arrow schema v1: round trips, multi-message assembly, and refusal of every kind of bad message."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from common.subtree import (
    FORMAT_VERSION,
    MAX_ID_CHARS,
    META_ACTOR_ID,
    META_FINAL,
    META_SEQ,
    META_TASK_ID,
    META_TREE_ID,
    META_VERSION,
    SCHEMA_V1,
    FormatVersionError,
    InconsistentLengthsError,
    InvalidNodeError,
    SchemaMismatchError,
    SubtreeDecodeError,
    SubtreeHeader,
    SubtreeMessage,
    TruncatedMessageError,
    assemble_tree,
    decode_subtree,
    encode_subtree,
    inspect_subtree,
    subtree_batch,
)
from common.tree import ROOT_PARENT, FinishReason, InvalidTreeError, NodeShape, TurnNode, TurnTree

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TREE_FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"

# ----------------------------------------------------------------------------------------- helpers


def small_nodes() -> list[TurnNode]:
    return [
        TurnNode(0, ROOT_PARENT, 0, [11, 12, 13], [], [], [], FinishReason.PROMPT),
        TurnNode(
            1,
            0,
            1,
            [14],
            [5, 6],
            [-0.25, -2.0],
            [3, 4],
            FinishReason.TOOL_CALL,
            entropy=1.125,
            topk_logprobs=[[-0.25, -1.5], [-2.0, -2.5]],
            tool_call="search(ü)",
        ),
        TurnNode(2, 1, 2, [15, 16], [7], [-0.5], [4], FinishReason.ANSWER, reward=1.0, is_leaf=True),
    ]


HEADER = SubtreeHeader(tree_id="tree-1", task_id="task-1", actor_id="actor-1", seq=0, final=True)


def small_message() -> bytes:
    return encode_subtree(HEADER, small_nodes())


def read_batch(data: bytes) -> pa.RecordBatch:
    return pa.ipc.open_stream(data).read_next_batch()


def write_stream(*batches: pa.RecordBatch, schema: pa.Schema | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema if schema is not None else batches[0].schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def rebuild(
    batch: pa.RecordBatch,
    *,
    columns: dict[str, pa.Array] | None = None,
    fields: dict[str, pa.Field] | None = None,
    drop: tuple[str, ...] = (),
    add: tuple[tuple[pa.Field, pa.Array], ...] = (),
    metadata: dict[bytes, bytes] | None = None,
) -> bytes:
    """The batch with some columns replaced/retyped/dropped/added, written as one IPC stream."""
    new_fields, new_columns = [], []
    for schema_field, column in zip(batch.schema, batch.columns, strict=True):
        if schema_field.name in drop:
            continue
        new_columns.append((columns or {}).get(schema_field.name, column))
        new_fields.append((fields or {}).get(schema_field.name, schema_field))
    for schema_field, column in add:
        new_fields.append(schema_field)
        new_columns.append(column)
    schema = pa.schema(new_fields, metadata=metadata if metadata is not None else batch.schema.metadata)
    return write_stream(pa.RecordBatch.from_arrays(new_columns, schema=schema))


def replace_values(name: str, values: list[Any], nullable: bool | None = None) -> bytes:
    """The small message with column `name` replaced by `values` (same type as v1)."""
    batch = read_batch(small_message())
    expected = SCHEMA_V1.field(name)
    column = pa.array(values, type=expected.type)
    field = expected.with_nullable(expected.nullable if nullable is None else nullable)
    return rebuild(batch, columns={name: column}, fields={name: field})


def with_metadata(**changes: bytes | None) -> bytes:
    batch = read_batch(small_message())
    metadata = dict(batch.schema.metadata)
    keys = {
        "version": META_VERSION,
        "tree_id": META_TREE_ID,
        "task_id": META_TASK_ID,
        "actor_id": META_ACTOR_ID,
        "seq": META_SEQ,
        "final": META_FINAL,
    }
    for name, value in changes.items():
        if value is None:
            metadata.pop(keys[name])
        else:
            metadata[keys[name]] = value
    return rebuild(batch, metadata=metadata)


DECODERS: list[Callable[[Any], Any]] = [decode_subtree, inspect_subtree, subtree_batch]


def assert_refused(data: Any, error: type[SubtreeDecodeError], fragment: str = "") -> None:
    """Every decoding entry point refuses `data` with `error` (and a message naming `fragment`)."""
    for decoder in DECODERS:
        with pytest.raises(error) as info:
            decoder(data)
        assert fragment in str(info.value), (decoder.__name__, str(info.value))


def assert_equal_nodes(got: list[TurnNode], expected: list[TurnNode]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.equals(b), (a, b)


# ----------------------------------------------------------------------------------------- strategies

f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
logprob = st.floats(min_value=-60.0, max_value=0.0, width=32)
text = st.text(max_size=12)
ident = st.text(min_size=1, max_size=20)


@st.composite
def turn(draw: st.DrawFn, node_id: int, parent_id: int, depth: int, is_leaf: bool, rewarded: bool) -> TurnNode:
    n = draw(st.integers(0, 6))
    n_topk = draw(st.integers(0, n))
    k = draw(st.integers(1, 4))
    topk = np.array(draw(st.lists(logprob, min_size=n_topk * k, max_size=n_topk * k)), dtype=np.float32)
    reward = draw(st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-5, 5).map(float)))
    return TurnNode(
        node_id=node_id,
        parent_id=parent_id,
        depth=depth,
        obs_ids=draw(st.lists(st.integers(0, 2**31 - 1), max_size=6)),
        token_ids=draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n)),
        logprobs=draw(st.lists(logprob, min_size=n, max_size=n)),
        versions=draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n)),
        finish_reason=draw(st.sampled_from([r for r in FinishReason if r is not FinishReason.PROMPT])),
        entropy=draw(st.one_of(st.just(math.nan), f32)),
        topk_logprobs=topk.reshape(n_topk, k),
        tool_call=draw(st.one_of(st.none(), text)),
        reward=reward if is_leaf and rewarded else None,
        is_leaf=is_leaf,
    )


@st.composite
def trees(draw: st.DrawFn, complete: bool) -> TurnTree:
    """A random tree: random shape, sparse shuffled ids; leaves rewarded when `complete`."""
    n = draw(st.integers(1, 10))
    parents = [ROOT_PARENT] + [draw(st.integers(0, i - 1)) for i in range(1, n + 1)]
    ids = draw(st.lists(st.integers(0, 2**31 - 1), min_size=n + 1, max_size=n + 1, unique=True))
    depths = [0]
    for i in range(1, n + 1):
        depths.append(depths[parents[i]] + 1)
    has_children = set(parents[1:])
    nodes = [
        TurnNode(
            ids[0],
            ROOT_PARENT,
            0,
            draw(st.lists(st.integers(0, 2**31 - 1), max_size=8)),
            [],
            [],
            [],
            FinishReason.PROMPT,
        )
    ]
    for i in range(1, n + 1):
        is_leaf = i not in has_children
        rewarded = complete or draw(st.booleans())
        nodes.append(draw(turn(ids[i], ids[parents[i]], depths[i], is_leaf, rewarded)))
    random.Random(draw(st.integers(0, 2**32))).shuffle(nodes)
    return TurnTree.from_nodes(draw(ident), draw(ident), draw(ident), nodes)


headers = st.builds(
    SubtreeHeader, tree_id=ident, task_id=ident, actor_id=ident, seq=st.integers(0, 10**12 - 1), final=st.booleans()
)


# ----------------------------------------------------------------------------------------- round trips


def test_small_message_round_trip() -> None:
    data = small_message()
    message = decode_subtree(data)
    assert message.header == HEADER
    assert_equal_nodes(message.nodes, small_nodes())
    assert message.nodes[1].tool_call == "search(ü)"
    assert message.nodes[1].topk_logprobs.shape == (2, 2)
    summary = inspect_subtree(data)
    assert summary.header == HEADER
    assert summary.num_nodes == 3
    assert summary.min_version == 3
    assert summary.max_version == 4
    assert summary.generated_tokens == 3
    assert summary.shapes == {
        0: NodeShape(ROOT_PARENT, 0, False, False),
        1: NodeShape(0, 1, False, False),
        2: NodeShape(1, 2, True, True),
    }
    header, batch = subtree_batch(data)
    assert header == HEADER
    assert batch.num_rows == 3
    assert batch.schema.equals(SCHEMA_V1, check_metadata=False)


def test_every_buffer_type_is_accepted() -> None:
    data = small_message()
    for view in (data, memoryview(data), pa.py_buffer(data), bytearray(data)):
        assert decode_subtree(view).header == HEADER
        assert inspect_subtree(view).num_nodes == 3


def test_message_without_generated_tokens_has_no_versions() -> None:
    data = encode_subtree(HEADER, small_nodes()[:1])
    summary = inspect_subtree(data)
    assert summary.min_version is None
    assert summary.max_version is None
    assert summary.generated_tokens == 0


@TREE_FUZZ
@given(trees(complete=False), headers)
def test_random_trees_round_trip(tree: TurnTree, header: SubtreeHeader) -> None:
    nodes = list(tree.nodes.values())
    data = encode_subtree(header, nodes)
    message = decode_subtree(data)
    assert message.header == header
    assert_equal_nodes(message.nodes, nodes)
    for got in message.nodes:
        assert got.token_ids.dtype == np.int32
        assert got.logprobs.dtype == np.float32
        assert got.versions.dtype == np.int32
        assert got.topk_logprobs.dtype == np.float32
    # Re-encoding the decoded nodes gives the same bytes: the codec is a function of the content.
    assert encode_subtree(message.header, message.nodes) == data

    summary = inspect_subtree(data)
    assert summary.header == header
    assert summary.num_nodes == len(nodes)
    assert summary.shapes == {
        n.node_id: NodeShape(n.parent_id, n.depth, n.is_leaf, n.reward is not None) for n in nodes
    }
    versions = [int(v) for n in nodes for v in n.versions]
    assert summary.generated_tokens == len(versions) == sum(len(n.token_ids) for n in nodes)
    assert summary.min_version == (min(versions) if versions else None)
    assert summary.max_version == (max(versions) if versions else None)

    batch_header, batch = subtree_batch(data)
    assert batch_header == header
    assert batch.column("node_id").to_pylist() == [n.node_id for n in nodes]


@st.composite
def split_trees(draw: st.DrawFn) -> tuple[TurnTree, list[bytes], int]:
    """A complete tree cut into 1..5 messages; one leaf first sent unrewarded, completed in the final one."""
    tree = draw(trees(complete=True))
    nodes = list(tree.nodes.values())
    k = draw(st.integers(1, min(5, len(nodes))))
    # Random partition with every part non-empty: shuffle, then cut at k-1 distinct points.
    order = draw(st.permutations(nodes))
    cuts = sorted(draw(st.lists(st.integers(1, len(nodes) - 1), min_size=k - 1, max_size=k - 1, unique=True)))
    parts = [list(order[a:b]) for a, b in zip([0, *cuts], [*cuts, len(nodes)], strict=True)]
    leaf = draw(st.sampled_from(tree.leaves()))
    final = len(parts) - 1
    for part in parts[:final]:
        for i, n in enumerate(part):
            if n is leaf:  # first sent as a plain, unfinished turn; the final message completes it
                part[i] = TurnNode(**{**_fields(n), "reward": None, "is_leaf": False})
                parts[final].append(n)
    header = {"tree_id": tree.tree_id, "task_id": tree.task_id, "actor_id": tree.actor_id}
    messages = [
        encode_subtree(SubtreeHeader(**header, seq=seq, final=seq == final), part) for seq, part in enumerate(parts)
    ]
    shuffled = draw(st.permutations(messages))
    return tree, list(shuffled), leaf.node_id


def _fields(n: TurnNode) -> dict[str, Any]:
    return {name: getattr(n, name) for name in TurnNode.__dataclass_fields__}


@TREE_FUZZ
@given(split_trees())
def test_split_tree_assembles_back(case: tuple[TurnTree, list[bytes], int]) -> None:
    tree, messages, _ = case
    assembled = assemble_tree(messages)
    assert (assembled.tree_id, assembled.task_id, assembled.actor_id) == (tree.tree_id, tree.task_id, tree.actor_id)
    assert sorted(assembled.nodes) == sorted(tree.nodes)
    for node_id, node in tree.nodes.items():
        assert assembled.nodes[node_id].equals(node)
    # Already-decoded messages assemble the same way.
    again = assemble_tree([decode_subtree(m) for m in messages])
    assert all(again.nodes[i].equals(n) for i, n in tree.nodes.items())


def _split_small() -> list[bytes]:
    """The small tree in two messages: the leaf sent unrewarded in seq 0, completed in seq 1."""
    root, turn1, leaf = small_nodes()
    pending = TurnNode(**{**_fields(leaf), "reward": None, "is_leaf": False})
    first = SubtreeHeader("tree-1", "task-1", "actor-1", seq=0, final=False)
    last = SubtreeHeader("tree-1", "task-1", "actor-1", seq=1, final=True)
    return [encode_subtree(first, [root, turn1, pending]), encode_subtree(last, [leaf])]


def test_assemble_small_split_tree() -> None:
    tree = assemble_tree(reversed(_split_small()))
    assert isinstance(tree, TurnTree)
    assert tree.nodes[2].reward == 1.0
    assert tree.nodes[2].is_leaf


def test_assemble_refuses_an_incomplete_or_inconsistent_set() -> None:
    first, last = _split_small()
    root, turn1, leaf = small_nodes()
    with pytest.raises(InvalidTreeError, match="no messages"):
        assemble_tree([])
    with pytest.raises(InvalidTreeError, match="exactly the last message must be final"):
        assemble_tree([first])  # the final message is missing
    with pytest.raises(InvalidTreeError, match=r"not 0\.\.0"):
        assemble_tree([last])  # seq 0 is missing
    with pytest.raises(InvalidTreeError, match=r"not 0\.\.2"):
        assemble_tree([first, last, last])  # seq 1 twice
    two_finals = encode_subtree(SubtreeHeader("tree-1", "task-1", "actor-1", 0, True), [root, turn1])
    with pytest.raises(InvalidTreeError, match="exactly the last message must be final"):
        assemble_tree([two_finals, last])
    other_tree = encode_subtree(SubtreeHeader("tree-2", "task-1", "actor-1", 1, True), [leaf])
    with pytest.raises(InvalidTreeError, match="another tree"):
        assemble_tree([first, other_tree])
    other_actor = encode_subtree(SubtreeHeader("tree-1", "task-1", "actor-2", 1, True), [leaf])
    with pytest.raises(InvalidTreeError, match="another tree"):
        assemble_tree([first, other_actor])
    changed = TurnNode(**{**_fields(leaf), "token_ids": [8], "logprobs": [-0.5], "versions": [4]})
    rewritten = encode_subtree(SubtreeHeader("tree-1", "task-1", "actor-1", 1, True), [changed])
    with pytest.raises(InvalidTreeError, match="different tokens"):
        assemble_tree([first, rewritten])
    unrewarded = encode_subtree(SubtreeHeader("tree-1", "task-1", "actor-1", 0, True), [root, turn1, leaf])
    assemble_tree([unrewarded])  # control: the same nodes complete in one message are fine
    never_completed = encode_subtree(
        SubtreeHeader("tree-1", "task-1", "actor-1", 0, True),
        [root, turn1, TurnNode(**{**_fields(leaf), "reward": None})],
    )
    with pytest.raises(InvalidTreeError, match="no reward"):
        assemble_tree([never_completed])
    with pytest.raises(SubtreeDecodeError):
        assemble_tree([first, b"garbage"])


def test_assemble_accepts_decoded_messages_and_later_seq_wins() -> None:
    first, last = _split_small()
    decoded = [decode_subtree(first), decode_subtree(last)]
    assert isinstance(decoded[0], SubtreeMessage)
    tree = assemble_tree(decoded[::-1])
    assert tree.nodes[2].is_leaf
    assert tree.nodes[2].reward == 1.0


# ----------------------------------------------------------------------------------------- encoder


def test_encoder_refuses_bad_headers_and_empty_messages() -> None:
    nodes = small_nodes()
    with pytest.raises(FormatVersionError):
        encode_subtree(SubtreeHeader("t", "k", "a", 0, True, format_version=2), nodes)
    with pytest.raises(InvalidNodeError, match="at least one node"):
        encode_subtree(HEADER, [])
    for bad in (
        SubtreeHeader("", "k", "a", 0, True),
        SubtreeHeader("t", "", "a", 0, True),
        SubtreeHeader("t", "k", "", 0, True),
        SubtreeHeader("x" * (MAX_ID_CHARS + 1), "k", "a", 0, True),
        SubtreeHeader("t", "k", "a", -1, True),
    ):
        with pytest.raises(SchemaMismatchError):
            encode_subtree(bad, nodes)
    longest = SubtreeHeader("é" * MAX_ID_CHARS, "k", "a", 0, True)
    assert decode_subtree(encode_subtree(longest, nodes)).header == longest


# ----------------------------------------------------------------------------------------- refusals


def test_wrong_or_missing_format_version() -> None:
    assert_refused(with_metadata(version=b"2"), FormatVersionError, "'2'")
    assert_refused(with_metadata(version=b"01"), FormatVersionError)
    assert_refused(with_metadata(version=b""), FormatVersionError)
    assert_refused(with_metadata(version=None), FormatVersionError, META_VERSION.decode())
    assert FORMAT_VERSION == 1


def test_no_schema_metadata_at_all() -> None:
    batch = read_batch(small_message())
    assert_refused(write_stream(batch.replace_schema_metadata(None)), FormatVersionError)


@pytest.mark.parametrize("key", ["tree_id", "task_id", "actor_id", "seq", "final"])
def test_missing_metadata_key(key: str) -> None:
    assert_refused(with_metadata(**{key: None}), SchemaMismatchError, f"at2po.{key}")


@pytest.mark.parametrize(
    "seq", [b"-1", b"", b"abc", b"1.5", b" 1", b"1e3", b"0x1", b"9" * 13, "²".encode(), "١".encode(), b"\xff"]
)
def test_bad_seq_metadata(seq: bytes) -> None:
    assert_refused(with_metadata(seq=seq), SchemaMismatchError)


@pytest.mark.parametrize("final", [b"2", b"", b"true", b"yes", b"01", b"\xff"])
def test_bad_final_metadata(final: bytes) -> None:
    assert_refused(with_metadata(final=final), SchemaMismatchError)


def test_good_seq_and_final_metadata() -> None:
    header = decode_subtree(with_metadata(seq=b"123456789012", final=b"0")).header
    assert header.seq == 123456789012
    assert header.final is False


@pytest.mark.parametrize("key", ["tree_id", "task_id", "actor_id"])
@pytest.mark.parametrize("value", [b"", b"x" * (MAX_ID_CHARS + 1), b"\xc3\x28"])
def test_bad_identity_metadata(key: str, value: bytes) -> None:
    assert_refused(with_metadata(**{key: value}), SchemaMismatchError)


@pytest.mark.parametrize("name", SCHEMA_V1.names)
def test_missing_column(name: str) -> None:
    assert_refused(rebuild(read_batch(small_message()), drop=(name,)), SchemaMismatchError, name)


def test_extra_column() -> None:
    extra = (pa.field("advantage", pa.float32()), pa.array([0.0, 1.0, 2.0], type=pa.float32()))
    assert_refused(rebuild(read_batch(small_message()), add=(extra,)), SchemaMismatchError, "advantage")


def test_duplicate_column() -> None:
    batch = read_batch(small_message())
    duplicate = (SCHEMA_V1.field("depth"), batch.column("depth"))
    assert_refused(rebuild(batch, add=(duplicate,)), SchemaMismatchError, "duplicate")


def test_columns_out_of_order() -> None:
    batch = read_batch(small_message())
    order = list(reversed(range(batch.num_columns)))
    schema = pa.schema([batch.schema.field(i) for i in order], metadata=batch.schema.metadata)
    reordered = pa.RecordBatch.from_arrays([batch.column(i) for i in order], schema=schema)
    assert_refused(write_stream(reordered), SchemaMismatchError, "order")


def test_declared_nullable_without_nulls_is_still_not_v1() -> None:
    batch = read_batch(small_message())
    field = SCHEMA_V1.field("node_id").with_nullable(True)
    assert_refused(rebuild(batch, fields={"node_id": field}), SchemaMismatchError)


MISTYPED: dict[str, pa.DataType] = {
    "node_id": pa.int64(),
    "parent_id": pa.int16(),
    "depth": pa.uint32(),
    "obs_ids": pa.list_(pa.int64()),
    "token_ids": pa.list_(pa.int64()),
    "logprobs": pa.list_(pa.float64()),
    "versions": pa.large_list(pa.int32()),
    "entropy": pa.float64(),
    "topk_logprobs": pa.list_(pa.list_(pa.float64())),
    "finish_reason": pa.large_string(),
    "tool_call": pa.binary(),
    "reward": pa.float32(),
    "is_leaf": pa.int8(),
}


@pytest.mark.parametrize("name", sorted(MISTYPED))
def test_mistyped_column(name: str) -> None:
    assert set(MISTYPED) == set(SCHEMA_V1.names)
    batch = read_batch(small_message())
    wrong = MISTYPED[name]
    column = batch.column(name).cast(wrong)
    field = pa.field(name, wrong, nullable=SCHEMA_V1.field(name).nullable)
    assert_refused(rebuild(batch, columns={name: column}, fields={name: field}), SchemaMismatchError, name)


def test_topk_with_wrong_nesting() -> None:
    batch = read_batch(small_message())
    flat = pa.array([[], [-0.25, -1.5], []], type=pa.list_(pa.float32()))
    field = pa.field("topk_logprobs", flat.type, nullable=False)
    assert_refused(
        rebuild(batch, columns={"topk_logprobs": flat}, fields={"topk_logprobs": field}),
        SchemaMismatchError,
        "topk_logprobs",
    )


NULLS: dict[str, list[Any]] = {
    "node_id": [0, None, 2],
    "parent_id": [-1, 0, None],
    "depth": [None, 1, 2],
    "obs_ids": [[11], None, [15]],
    "token_ids": [[], [5, 6], None],
    "logprobs": [[], None, [-0.5]],
    "versions": [None, [3, 4], [4]],
    "entropy": [None, 1.0, 1.0],
    "topk_logprobs": [[], None, []],
    "finish_reason": ["prompt", None, "answer"],
    "is_leaf": [False, False, None],
}


@pytest.mark.parametrize("name", sorted(NULLS))
def test_nulls_in_non_nullable_columns(name: str) -> None:
    assert set(NULLS) == {f.name for f in SCHEMA_V1 if not f.nullable}
    assert_refused(replace_values(name, NULLS[name], nullable=True), SchemaMismatchError, name)


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("obs_ids", [[11, None], [14], [15]]),
        ("token_ids", [[], [5, None], [7]]),
        ("logprobs", [[], [-0.25, None], [-0.5]]),
        ("versions", [[], [3, 4], [None]]),
        ("topk_logprobs", [[], [[-0.25, None], [-2.0, -2.5]], []]),
        ("topk_logprobs", [[], [None, [-2.0, -2.5]], []]),
    ],
)
def test_null_list_items(name: str, values: list[Any]) -> None:
    assert_refused(replace_values(name, values, nullable=False), SchemaMismatchError, name)


def test_nulls_in_nullable_columns_are_fine() -> None:
    message = decode_subtree(replace_values("tool_call", [None, None, None]))
    assert [n.tool_call for n in message.nodes] == [None, None, None]
    message = decode_subtree(replace_values("reward", [None, None, None]))
    assert [n.reward for n in message.nodes] == [None, None, None]


@pytest.mark.parametrize(
    ("name", "values", "fragment"),
    [
        ("logprobs", [[], [-0.25], [-0.5]], "row 1: logprobs"),
        ("logprobs", [[], [-0.25, -2.0], [-0.5, -0.5]], "row 2: logprobs"),
        ("logprobs", [[-1.0], [-0.25, -2.0], [-0.5]], "row 0: logprobs"),
        ("versions", [[], [3, 4, 5], [4]], "row 1: versions"),
        ("versions", [[], [3, 4], []], "row 2: versions"),
        ("token_ids", [[], [5, 6], [7, 8]], "row 2"),
        ("topk_logprobs", [[], [[-0.1], [-0.2], [-0.3]], []], "topk_logprobs"),
        ("topk_logprobs", [[[-0.1]], [], []], "topk_logprobs"),
        ("topk_logprobs", [[], [[-0.1, -0.2], [-0.3]], []], "row 1: topk_logprobs rows must all have the same k"),
    ],
)
def test_inconsistent_lengths(name: str, values: list[Any], fragment: str) -> None:
    assert_refused(replace_values(name, values), InconsistentLengthsError, fragment)


def test_ragged_topk_across_rows_is_fine() -> None:
    # k must be constant within a node, not across nodes.
    data = replace_values("topk_logprobs", [[], [[-0.1, -0.2, -0.3], [-0.3, -0.4, -0.5]], [[-0.5]]])
    nodes = decode_subtree(data).nodes
    assert nodes[1].topk_logprobs.shape == (2, 3)
    assert nodes[2].topk_logprobs.shape == (1, 1)
    assert inspect_subtree(data).num_nodes == 3


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("node_id", [0, 1, 1]),
        ("node_id", [0, -5, 2]),
        ("parent_id", [-1, -2, 1]),
        ("parent_id", [-1, 1, 1]),
        ("depth", [1, 1, 2]),
        ("depth", [0, 0, 2]),
        ("depth", [0, 1, -1]),
        ("obs_ids", [[11, -1], [14], [15, 16]]),
        ("token_ids", [[], [5, -6], [7]]),
        ("versions", [[], [3, -4], [4]]),
        ("logprobs", [[], [-0.25, 0.5], [-0.5]]),
        ("logprobs", [[], [-0.25, float("nan")], [-0.5]]),
        ("logprobs", [[], [-0.25, float("-inf")], [-0.5]]),
        ("finish_reason", ["prompt", "tool_call", "gave_up"]),
        ("finish_reason", ["prompt", "TOOL_CALL", "answer"]),
        ("reward", [None, None, float("nan")]),
        ("reward", [None, None, float("inf")]),
        ("reward", [None, 1.0, 1.0]),
        ("is_leaf", [True, False, True]),
    ],
)
def test_invalid_nodes(name: str, values: list[Any]) -> None:
    assert_refused(replace_values(name, values), InvalidNodeError)


def test_no_rows() -> None:
    batch = read_batch(small_message()).slice(0, 0)
    assert_refused(write_stream(batch), InvalidNodeError, "at least one node")


def test_sliced_batch_is_read_correctly() -> None:
    # Writing a slice makes Arrow rebase list offsets; the decoder must not rely on offsets starting at 0.
    batch = read_batch(small_message()).slice(1, 2)
    message = decode_subtree(write_stream(batch))
    assert_equal_nodes(message.nodes, small_nodes()[1:])


def test_two_record_batches() -> None:
    batch = read_batch(small_message())
    assert_refused(write_stream(batch, batch), SchemaMismatchError, "exactly one record batch")


def test_schema_without_record_batch() -> None:
    schema = read_batch(small_message()).schema
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema):
        pass
    assert_refused(sink.getvalue().to_pybytes(), TruncatedMessageError, "no record batch")


def test_empty_bytes() -> None:
    assert_refused(b"", TruncatedMessageError, "empty")
    assert_refused(memoryview(b""), TruncatedMessageError)


def test_arrow_file_format_is_not_a_stream() -> None:
    batch = read_batch(small_message())
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    assert_refused(sink.getvalue().to_pybytes(), SubtreeDecodeError)


def test_every_truncation_is_refused() -> None:
    data = small_message()
    assert data.endswith(EOS)
    for cut in range(len(data)):
        if cut == len(data) - len(EOS):
            # The Arrow stream format allows ending at end-of-input instead of an EOS marker: all
            # content is there, so this one prefix is a complete message.
            assert_equal_nodes(decode_subtree(data[:cut]).nodes, small_nodes())
            continue
        for decoder in DECODERS:
            with pytest.raises(SubtreeDecodeError):
                decoder(data[:cut])


def test_garbage_after_the_stream_end_is_ignored() -> None:
    # Bytes after the EOS marker are never read; the message is whole.
    assert decode_subtree(small_message() + b"trailing").header == HEADER


@FUZZ
@given(st.binary(max_size=600))
def test_random_garbage_is_refused(data: bytes) -> None:
    for decoder in DECODERS:
        with pytest.raises(SubtreeDecodeError):
            decoder(data)


def _outcome(decoder: Callable[[bytes], Any], data: bytes) -> Any:
    try:
        return decoder(data)
    except SubtreeDecodeError as error:
        return error


mutation = st.tuples(st.sampled_from(["flip", "set", "insert", "delete"]), st.integers(0, 2**20), st.integers(0, 255))


def _mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    buffer = bytearray(data)
    for op, position, value in mutations:
        if op == "insert":
            buffer.insert(position % (len(buffer) + 1), value)
            continue
        if not buffer:
            continue
        i = position % len(buffer)
        if op == "flip":
            buffer[i] ^= 1 << (value % 8)
        elif op == "set":
            buffer[i] = value
        else:
            del buffer[i]
    return bytes(buffer)


def _check_mutant(data: bytes) -> None:
    """A mutant is refused with SubtreeDecodeError by every decoder, or accepted by all as valid."""
    outcomes = [_outcome(decoder, data) for decoder in DECODERS]
    accepted = [not isinstance(o, SubtreeDecodeError) for o in outcomes]
    assert len(set(accepted)) == 1, f"decoders disagree: {outcomes}"
    if accepted[0]:
        message, summary, (header, batch) = outcomes
        for n in message.nodes:
            n.validate()
        assert summary.header == header == message.header
        assert summary.num_nodes == batch.num_rows == len(message.nodes)
        assert summary.shapes == {
            n.node_id: NodeShape(n.parent_id, n.depth, n.is_leaf, n.reward is not None) for n in message.nodes
        }
        assert summary.generated_tokens == sum(len(n.token_ids) for n in message.nodes)
        # A decoded mutant re-encodes into a message that decodes to the same nodes (compared as bytes:
        # a mutant may hold NaN top-k log-probs, which `equals` does not treat as equal).
        again = encode_subtree(message.header, message.nodes)
        assert encode_subtree(message.header, decode_subtree(again).nodes) == again


@FUZZ
@given(st.lists(mutation, min_size=1, max_size=6))
def test_mutated_messages_are_refused_or_valid(mutations: list[tuple[str, int, int]]) -> None:
    _check_mutant(_mutate(small_message(), mutations))


@TREE_FUZZ
@given(trees(complete=False), headers, st.lists(mutation, min_size=1, max_size=3))
def test_mutated_random_messages_are_refused_or_valid(
    tree: TurnTree, header: SubtreeHeader, mutations: list[tuple[str, int, int]]
) -> None:
    data = encode_subtree(header, list(tree.nodes.values()))
    mutant = _mutate(data, mutations)
    assume(mutant != data)
    _check_mutant(mutant)


def test_single_byte_mutations_exhaustively_on_the_body() -> None:
    """Every position of the small message flipped to 0x00 and 0xFF (deterministic complement to the fuzz)."""
    data = small_message()
    for i in range(len(data)):
        for value in (0x00, 0xFF):
            if data[i] != value:
                _check_mutant(data[:i] + bytes([value]) + data[i + 1 :])
