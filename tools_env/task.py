"""The task record every environment, loader and generator in tools_env/ shares.

A task is one question with its gold answers. Loaders (Search-R1 Parquet/JSONL), the synthetic
multi-hop world and the arithmetic generator all produce `Task`s, so environments and rewards never
care where a question came from. `metadata` carries what a particular source knows beyond that (the
oracle search path of a synthetic question, the number of hops, a dataset's original row index) as
plain JSON-compatible values, so a task can be written to JSONL and read back unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Task:
    """One question to solve: its id, text, gold answers and where it came from."""

    task_id: str
    question: str
    golden_answers: tuple[str, ...]
    data_source: str
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.task_id:
            raise ValueError("task_id must not be empty")
        if not isinstance(self.golden_answers, tuple):
            object.__setattr__(self, "golden_answers", tuple(self.golden_answers))
        if not all(isinstance(answer, str) for answer in self.golden_answers):
            raise ValueError(f"task {self.task_id}: golden answers must be strings")

    def to_json(self) -> str:
        """One JSON line (the form `Task.from_json` reads)."""
        return json.dumps(
            {
                "task_id": self.task_id,
                "question": self.question,
                "golden_answers": list(self.golden_answers),
                "data_source": self.data_source,
                "metadata": dict(self.metadata),
            },
            ensure_ascii=False,
            sort_keys=True,
        )

    @property
    def hops(self) -> int | None:
        """The hop count when the metadata has one (the synthetic world's questions do; a dataset may give a string)."""
        value = self.metadata.get("hops")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
        return None

    @classmethod
    def from_json(cls, line: str) -> Task:
        record = json.loads(line)
        return cls(
            task_id=str(record["task_id"]),
            question=str(record["question"]),
            golden_answers=tuple(str(answer) for answer in record["golden_answers"]),
            data_source=str(record["data_source"]),
            metadata=dict(record.get("metadata") or {}),
        )
