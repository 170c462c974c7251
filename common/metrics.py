"""Metrics as JSON lines, one object per event, so runs can be studied with pandas, Polars or DuckDB.

Only JSON-native values are accepted: a numpy or torch scalar slipping in would otherwise be written
as an opaque string (or fail deep inside json), so `emit` rejects it at the call site instead.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

_RESERVED = ("ts", "role", "name")


def _check_value(value: Any, where: str) -> Any:
    """Validate one field value and return it ready for json (non-finite floats become null)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        # NaN/inf are not JSON; many readers reject them, so they are written as null.
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_check_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"metric field {where}: dict key {key!r} is {type(key).__name__}, not str")
            out[key] = _check_value(item, f"{where}.{key}")
        return out
    raise TypeError(
        f"metric field {where} is {type(value).__name__}; only None, bool, int, float, str and lists/dicts "
        "of those are allowed (convert numpy/torch scalars with .item())"
    )


class MetricsWriter:
    """Appends one JSON object per `emit` to a file (flushed per line); does nothing when path is None."""

    def __init__(self, path: str | Path | None, role: str) -> None:
        self.role = role
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._closed = False
        self._file: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", buffering=1, encoding="utf-8")

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def emit(self, name: str, **fields: Any) -> None:
        """Write `{"ts", "role", "name", **fields}` as one line; fields are validated even when disabled."""
        if self._closed:
            raise ValueError("emit on a closed MetricsWriter")
        for key in _RESERVED:
            if key in fields:
                raise ValueError(f"metric field name {key!r} is reserved")
        record: dict[str, Any] = {"ts": time.time(), "role": self.role, "name": name}
        for key, value in fields.items():
            record[key] = _check_value(value, key)
        if self._file is None:
            return
        line = json.dumps(record, separators=(",", ":"), allow_nan=False)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Counters:
    """Monotonically increasing integer counters (messages, bytes, drops); unknown names read as 0."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = dict.fromkeys(names, 0)

    def inc(self, name: str, by: int = 1) -> int:
        """Add `by` (a non-negative int) and return the new value."""
        if isinstance(by, bool) or not isinstance(by, int):
            raise TypeError(f"counter {name!r}: increment must be an int, got {type(by).__name__}")
        if by < 0:
            raise ValueError(f"counter {name!r} only increases; got increment {by}")
        with self._lock:
            value = self._values.get(name, 0) + by
            self._values[name] = value
            return value

    def get(self, name: str) -> int:
        with self._lock:
            return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        """A copy of all counters, safe to emit or compare while others keep counting."""
        with self._lock:
            return dict(self._values)
