"""Role processes under a local supervisor: start, watch, restart (bounded), stop in order.

Decided here:
- Each role is a child process running its own `at2po <role> ...` command, with stdout and stderr
  appended to `<run>/logs/<name>.log` (a restart appends to the same file).
- A role that exits with a non-zero code or is killed by a signal while the run goes on is restarted
  with its `restart_argv` (the learner's adds `--resume`) up to `max_restarts` times, each restart
  logged; after that it is `failed` and the run carries on without it (the caller decides whether that
  ends the run). A role that exits 0 on its own is `finished` and not restarted.
- Stopping sends SIGTERM to the roles in the given order, waiting up to `grace_s` for each group,
  then SIGKILL. Every child is in its own process group, so a Ctrl-C at the terminal reaches the
  supervisor only, which then stops the roles in order (actors first, so nothing new is generated;
  the learner next, which checkpoints; replay last, which commits what was acked). On Linux each child
  also gets SIGTERM if the supervisor itself dies (PR_SET_PDEATHSIG), so no role is left orphaned.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from common.log import get_logger

log = get_logger("ops.supervisor")

RoleState = Literal["new", "running", "restarting", "finished", "failed", "stopped"]


@dataclass(frozen=True)
class RoleSpec:
    name: str
    argv: list[str]
    log_path: Path
    restart_argv: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RoleHealth:
    name: str
    state: RoleState
    pid: int | None
    restarts: int
    uptime_s: float
    last_exit: int | None


def _die_with_parent() -> None:
    """In the child (Linux): SIGTERM when the supervisor dies, even by SIGKILL, so no role is orphaned."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


class ManagedRole:
    """One role's process and its restart bookkeeping."""

    def __init__(self, spec: RoleSpec) -> None:
        self.spec = spec
        self.process: subprocess.Popen[bytes] | None = None
        self.state: RoleState = "new"
        self.restarts = 0
        self.started_at = 0.0
        self.last_exit: int | None = None
        self._log: IO[bytes] | None = None

    def start(self, restart: bool = False) -> None:
        self.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self._log is None:
            self._log = self.spec.log_path.open("ab")
        argv = self.spec.restart_argv if restart and self.spec.restart_argv else self.spec.argv
        self.process = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.spec.env},
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.started_at = time.monotonic()
        self.state = "running"

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def health(self) -> RoleHealth:
        alive = self.state == "running" and self.poll() is None
        return RoleHealth(
            name=self.spec.name,
            state=self.state,
            pid=self.process.pid if self.process is not None else None,
            restarts=self.restarts,
            uptime_s=time.monotonic() - self.started_at if alive else 0.0,
            last_exit=self.last_exit,
        )

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class Supervisor:
    """Starts roles, restarts the ones that die (bounded), stops them in order."""

    def __init__(self, specs: Sequence[RoleSpec], max_restarts: int, grace_s: float) -> None:
        self.roles = {spec.name: ManagedRole(spec) for spec in specs}
        self.max_restarts = max_restarts
        self.grace_s = grace_s
        self.events: list[str] = []

    def start(self, names: Sequence[str] | None = None) -> None:
        for name in names or list(self.roles):
            self.roles[name].start()
            log.info("role started", role=name, pid=self.roles[name].process.pid)  # type: ignore[union-attr]

    def check(self) -> list[str]:
        """Restart roles that died; returns the names that were restarted now."""
        restarted: list[str] = []
        for name, role in self.roles.items():
            if role.state != "running":
                continue
            code = role.poll()
            if code is None:
                continue
            role.last_exit = code
            if code == 0:
                role.state = "finished"
                self._event(f"{name} finished (exit 0)")
                continue
            if role.restarts >= self.max_restarts:
                role.state = "failed"
                self._event(f"{name} died (exit {code}) and has used its {self.max_restarts} restarts: given up")
                log.error("role failed", role=name, exit=code, restarts=role.restarts)
                continue
            role.restarts += 1
            role.start(restart=True)
            restarted.append(name)
            self._event(f"{name} died (exit {code}); restart {role.restarts}/{self.max_restarts}")
            log.warning("role restarted", role=name, exit=code, restarts=role.restarts)
        return restarted

    def stop(self, order: Sequence[Sequence[str]]) -> None:
        """SIGTERM each group of roles in turn; SIGKILL what has not exited after the grace time."""
        seen: set[str] = set()
        for group in [*order, [n for n in self.roles if n not in {x for g in order for x in g}]]:
            members = [self.roles[n] for n in group if n in self.roles and n not in seen]
            seen.update(group)
            for role in members:
                role.signal(signal.SIGTERM)
            deadline = time.monotonic() + self.grace_s
            for role in members:
                if role.process is None:
                    continue
                try:
                    role.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("role did not stop in time; killing it", role=role.spec.name)
                    role.signal(signal.SIGKILL)
                    role.process.wait(timeout=30)
                role.last_exit = role.process.returncode
                if role.state == "running":
                    role.state = "stopped"
                role.close()

    def health(self) -> list[RoleHealth]:
        return [role.health() for role in self.roles.values()]

    def _event(self, text: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")
