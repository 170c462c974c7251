"""Helpers the process-level tests share: how to call the CLI, a free loopback endpoint, a reader in a child."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def at2po() -> list[str]:
    """The `at2po` command of this venv (or `python -m ops.cli` when the script is not installed)."""
    script = Path(sys.executable).parent / "at2po"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ops.cli"]


def free_endpoint() -> str:
    """A tcp endpoint on 127.0.0.1 whose port was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


_READ_IN_CHILD = """
import json, sys
from common.store_reader import StoreReader, StoreReferenceError
from common.wire import SampledTreeInfo, StoreReference
request = json.load(sys.stdin)
reader = StoreReader()
try:
    trees = reader.read(
        StoreReference.model_validate(request["store"]),
        [SampledTreeInfo.model_validate(info) for info in request["trees"]],
    )
    print(json.dumps({"trees": [[m.hex() for m in tree] for tree in trees]}))
except StoreReferenceError as error:
    print(json.dumps({"error": str(error), "permanent": error.permanent}))
"""


def read_by_reference_in_child(store: Any, trees: Sequence[Any]) -> list[list[bytes]] | tuple[str, bool]:
    """`common.store_reader.StoreReader.read` in another process (LMDB opens a store once per process,
    as a learner beside replay does): the trees' bytes, or (error, permanent)."""
    request = {"store": store.model_dump(), "trees": [info.model_dump() for info in trees]}
    done = subprocess.run(
        [sys.executable, "-c", _READ_IN_CHILD],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    if "error" in answer:
        return answer["error"], bool(answer["permanent"])
    return [[bytes.fromhex(m) for m in tree] for tree in answer["trees"]]
