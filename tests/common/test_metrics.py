"""JSON-lines metrics and monotonic counters."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from common.metrics import Counters, MetricsWriter


def _read(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_emit_writes_one_flushed_line_per_call(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.jsonl"
    before = time.time()
    writer = MetricsWriter(path, role="replay")
    writer.emit("store", trees=3, bytes_per_s=1.5e6, ok=True, note=None, tags=["a", "b"], hist={"p50": 2})
    # Flushed per line: readable before close.
    [record] = _read(path)
    assert record == {
        "ts": record["ts"],
        "role": "replay",
        "name": "store",
        "trees": 3,
        "bytes_per_s": 1.5e6,
        "ok": True,
        "note": None,
        "tags": ["a", "b"],
        "hist": {"p50": 2},
    }
    assert isinstance(record["ts"], float) and before <= record["ts"] <= time.time()
    writer.emit("store", trees=4)
    writer.close()
    assert [r["trees"] for r in _read(path)] == [3, 4]


def test_append_mode_keeps_earlier_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    with MetricsWriter(path, role="a") as writer:
        writer.emit("x", v=1)
    with MetricsWriter(path, role="b") as writer:
        writer.emit("x", v=2)
    assert [(r["role"], r["v"]) for r in _read(path)] == [("a", 1), ("b", 2)]


@pytest.mark.parametrize(
    "value",
    [object(), (1, 2), {1, 2}, b"bytes", [1, object()], {"k": {"deep": (1,)}}, {1: "int key"}, 1 + 2j],
)
def test_non_json_values_are_rejected(tmp_path: Path, value: object) -> None:
    path = tmp_path / "m.jsonl"
    with MetricsWriter(path, role="r") as writer, pytest.raises(TypeError, match="metric field"):
        writer.emit("bad", field=value)
    assert path.read_text() == ""


def test_non_finite_floats_become_null(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    with MetricsWriter(path, role="r") as writer:
        writer.emit("loss", value=float("nan"), values=[float("inf"), 1.0])
    [record] = _read(path)  # strict JSON: json.loads would accept NaN, so check the text too
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert record["value"] is None and record["values"] == [None, 1.0]


def test_reserved_field_names_are_rejected(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path / "m.jsonl", role="r") as writer:
        for key in ("ts", "role"):
            with pytest.raises(ValueError, match=key):
                writer.emit("x", **{key: 1})


def test_disabled_writer_is_a_noop_that_still_validates(tmp_path: Path) -> None:
    writer = MetricsWriter(None, role="actor")
    assert not writer.enabled
    writer.emit("fine", v=1)
    with pytest.raises(TypeError):
        writer.emit("bad", v=object())
    writer.close()
    assert list(tmp_path.iterdir()) == []


def test_emit_after_close_raises(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "m.jsonl", role="r")
    writer.close()
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.emit("late")


def test_concurrent_emits_give_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    with MetricsWriter(path, role="r") as writer:

        def work(worker: int) -> None:
            for i in range(200):
                writer.emit("tick", worker=worker, i=i, pad="x" * 100)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    records = _read(path)
    assert len(records) == 800
    assert {(r["worker"], r["i"]) for r in records} == {(w, i) for w in range(4) for i in range(200)}


def test_counters() -> None:
    counters = Counters(["acks"])
    assert counters.snapshot() == {"acks": 0}
    assert counters.get("never") == 0
    assert counters.inc("acks") == 1
    assert counters.inc("bytes", by=512) == 512
    counters.inc("bytes", by=0)
    snap = counters.snapshot()
    counters.inc("acks")
    assert snap == {"acks": 1, "bytes": 512}  # a snapshot is a copy
    assert counters.get("acks") == 2
    with pytest.raises(ValueError, match="only increases"):
        counters.inc("acks", by=-1)
    with pytest.raises(TypeError):
        counters.inc("acks", by=1.5)  # type: ignore[arg-type]
    assert counters.get("acks") == 2


def test_counters_are_thread_safe() -> None:
    counters = Counters()

    def work() -> None:
        for _ in range(5000):
            counters.inc("n")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counters.get("n") == 20000
