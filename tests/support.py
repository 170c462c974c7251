"""Helpers the process-level tests share: how to call the CLI, and a free loopback endpoint."""

from __future__ import annotations

import socket
import sys
from pathlib import Path


def at2po() -> list[str]:
    """The `at2po` command of this venv (or `python -m ops.cli` when the script is not installed)."""
    script = Path(sys.executable).parent / "at2po"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ops.cli"]


def free_endpoint() -> str:
    """A tcp endpoint on 127.0.0.1 whose port was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"
