"""The live view of `at2po run`: progress figures and each role's health, rendered with rich."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table

from ops.roles import RoleHealth

_STATE_STYLE = {
    "running": "green",
    "finished": "cyan",
    "stopped": "cyan",
    "restarting": "yellow",
    "failed": "bold red",
    "new": "dim",
}


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def render(
    phase: str,
    budget_s: float,
    figures: dict[str, Any],
    health: Sequence[RoleHealth],
    em_warmstart: float | None,
    events: Sequence[str],
) -> Group:
    progress = Table.grid(padding=(0, 2))
    progress.add_column(style="bold")
    progress.add_column()
    progress.add_column(style="bold")
    progress.add_column()
    elapsed = figures.get("elapsed_s", 0.0)
    rows = [
        ("phase", phase, "elapsed", f"{elapsed / 60:.1f} / {budget_s / 60:.0f} min"),
        ("learner step", _fmt(figures.get("learner_step")), "version", _fmt(figures.get("learner_version"))),
        ("reward (last 5)", _fmt(figures.get("reward"), 3), "policy entropy", _fmt(figures.get("entropy"), 3)),
        (
            "held-out EM",
            f"{_fmt(em_warmstart, 1)} warm start -> {_fmt(figures.get('heldout_em'), 1)}",
            "staleness",
            _fmt(figures.get("staleness_mean")),
        ),
        (
            "trees/s",
            _fmt(figures.get("trees_per_s"), 3),
            "generated tok/s",
            _fmt(figures.get("generated_tokens_per_s"), 0),
        ),
        ("trees done", _fmt(figures.get("trees_done")), "learner tok/s", _fmt(figures.get("learner_tokens_per_s"), 0)),
        (
            "replay ready",
            _fmt(figures.get("replay_ready")),
            "learner busy",
            _fmt(100 * figures["busy_fraction"], 0) + "%"
            if isinstance(figures.get("busy_fraction"), float) and not math.isnan(figures["busy_fraction"])
            else "-",
        ),
    ]
    for row in rows:
        progress.add_row(*row)
    roles = Table(title="roles", expand=False)
    for column in ("role", "state", "pid", "restarts", "uptime", "last exit"):
        roles.add_column(column)
    for role in health:
        style = _STATE_STYLE.get(role.state, "")
        roles.add_row(
            role.name,
            f"[{style}]{role.state}[/{style}]" if style else role.state,
            _fmt(role.pid),
            str(role.restarts),
            f"{role.uptime_s:.0f} s" if role.uptime_s else "-",
            _fmt(role.last_exit),
        )
    parts: list[Any] = [Panel(progress, title="at2po run"), roles]
    if events:
        parts.append(Panel("\n".join(events[-4:]), title="events"))
    return Group(*parts)
