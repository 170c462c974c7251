"""`at2po run`: the embedded default, every role as a local process, from tiny model to report.

Phases (each one logged, the whole run bounded by `supervisor.max_minutes`):
1. prepare the run directory: the resolved config (`config.toml`, with run-local paths and, where the
   endpoints are the defaults, free loopback ports) is what every role reads, so the same file
   starts the roles by hand;
2. the tiny policy (`at2po model init-tiny`, copy-pretrained for `model.init_copy_steps`) if `model.dir` has none;
3. the warm start (`at2po sft run`) unless `supervisor.warm_start` is off or its output exists;
4. held-out evaluation of the warm-started policy (`at2po eval`);
5. replay, `supervisor.actors` actors and the learner as supervised processes, trained with AT²PO until
   the budget (minus the time the final evaluation needs) or Ctrl-C; dead roles are restarted. Where
   `actor.torch_threads` / `learner.torch_threads` are unset, the machine's cores are split between
   the actor and learner processes (`role_threads`) and passed on their command lines: each torch
   process otherwise takes every core, and 3 of them on 2 cores ran 6x slower (0.13 against 0.8
   trees/s, measured); the warm start and evaluations, which run alone, keep every core. Periodic
   held-out evaluations (`supervisor.eval_every_steps`) run as a process beside the roles, with one
   torch thread, so supervision goes on meanwhile; one still running when training ends is stopped;
6. held-out evaluation of the learner's last checkpoint, `summary.json`, and the report.

Ctrl-C stops every role cleanly (actors, then the learner, which checkpoints, then replay) and still
writes the summary and report of what was done; the final evaluation is skipped then, so a second
Ctrl-C is not needed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.live import Live

from common.config import RunConfig, TransportConfig, build_config, dump_config
from common.log import get_logger
from common.metrics import MetricsWriter
from learner import checkpoint
from ops.live_view import render
from ops.roles import RoleSpec, Supervisor
from ops.run_metrics import MetricsTail, RunHistory

log = get_logger("ops.run")

SHUTDOWN_RESERVE_S = 45.0


def at2po_argv() -> list[str]:
    script = Path(sys.executable).parent / "at2po"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ops.cli"]


def role_threads(cores: int, torch_processes: int) -> int:
    """torch threads per process when `torch_processes` busy processes share `cores` (at least 1)."""
    return max(1, cores // max(1, torch_processes))


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _free_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


@dataclass(frozen=True)
class RunPaths:
    out: Path

    @property
    def config(self) -> Path:
        return self.out / "config.toml"

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def metrics(self) -> Path:
        return self.out / "metrics"

    @property
    def evals(self) -> Path:
        return self.out / "eval"

    @property
    def checkpoints(self) -> Path:
        return self.out / "learner"

    @property
    def summary(self) -> Path:
        return self.out / "summary.json"


def resolve_run_config(config: RunConfig, paths: RunPaths) -> RunConfig:
    """Run-local paths for the stores, checkpoints and metrics; free ports for default endpoints."""
    data = config.model_dump()
    data["replay"]["dir"] = str(paths.out / "replay")
    data["learner"]["checkpoint_dir"] = str(paths.checkpoints)
    data["logging"]["metrics_path"] = None
    data["logging"]["json_logs"] = True
    defaults = TransportConfig()
    for key in ("replay_endpoint", "weights_pub_endpoint", "weights_endpoint"):
        if data["transport"][key] == getattr(defaults, key):
            data["transport"][key] = _free_endpoint()
    return build_config(data)


@dataclass
class _BackgroundEval:
    """A periodic held-out evaluation running beside the training roles."""

    process: subprocess.Popen[bytes]
    label: str
    step: int
    out: Path
    started: float


class LocalRun:
    """One `at2po run`: phases in order, with a live view while training."""

    def __init__(
        self,
        config: RunConfig,
        out_dir: Path,
        console: Console | None = None,
        token_budget: int | None = None,
        em_warmstart: float | None = None,
    ) -> None:
        """`token_budget` also ends training once the actors generated that many tokens (equal-cost
        comparisons); `em_warmstart` is a known warm-start EM, so a sweep evaluates the warm start once."""
        self.paths = RunPaths(out_dir)
        self.token_budget = token_budget
        self.console = console or Console(stderr=True)
        self.paths.out.mkdir(parents=True, exist_ok=True)
        self.config = resolve_run_config(config, self.paths)
        self.paths.config.write_text(dump_config(self.config), encoding="utf-8")
        self.started = time.monotonic()
        self.budget_s = self.config.supervisor.max_minutes * 60.0
        self.interrupted = False
        self.phase = "prepare"
        self.history = RunHistory()
        self.tail = MetricsTail(self.paths.metrics)
        self.eval_records = MetricsWriter(self.paths.metrics / "eval.jsonl", "eval")
        self.em_warmstart: float | None = em_warmstart
        self.em_final: float | None = None
        self.eval_seconds: float | None = None
        self.supervisor: Supervisor | None = None
        self._background_eval: _BackgroundEval | None = None

    # ---------------------------------------------------------------------------------- helpers

    def _at2po(self, *args: str) -> list[str]:
        return [*at2po_argv(), *args]

    def _command(self, name: str, argv: list[str]) -> None:
        """Run one phase's command to the end, its output in logs/<name>.log; raise if it fails."""
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.paths.logs / f"{name}.log"
        with log_path.open("ab") as handle:
            result = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise RuntimeError(f"{name} failed (exit {result.returncode}); see {log_path}")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    # ----------------------------------------------------------------------------------- phases

    def ensure_model(self) -> None:
        model_dir = Path(self.config.model.dir)
        if (model_dir / "config.json").is_file():
            return
        self.phase = "tiny policy"
        self.console.print(f"[bold]making the tiny policy[/bold] in {model_dir}")
        copy_steps = str(self.config.model.init_copy_steps)
        argv = self._at2po("model", "init-tiny", "--out", str(model_dir), "--copy-steps", copy_steps)
        self._command("init-tiny", argv)

    def warm_start(self) -> Path:
        """The model RL starts from: the warm-started one (made now if missing) or `model.dir`."""
        if not self.config.supervisor.warm_start:
            return Path(self.config.model.dir)
        out = Path(self.config.sft.out_dir)
        if (out / "config.json").is_file():
            self.console.print(f"warm start: reusing {out}")
            return out
        self.phase = "warm start"
        self.console.print(f"[bold]warm start[/bold]: fine-tuning on demonstrations into {out}")
        self._command("sft", self._at2po("sft", "run", "--config", str(self.paths.config), "--out", str(out)))
        return out

    def _eval_argv(self, model_dir: Path, out: Path, *overrides: str) -> list[str]:
        argv = self._at2po(
            "eval",
            "--config",
            str(self.paths.config),
            "--model",
            str(model_dir),
            "--limit",
            str(self.config.supervisor.eval_limit),
            "--json",
            "--out",
            str(out),
        )
        return argv + [arg for override in overrides for arg in ("--set", override)]

    def _record_eval(self, label: str, step: int, out: Path, seconds: float) -> float | None:
        report = json.loads(out.read_text(encoding="utf-8"))
        em = headline_em(report)
        self.eval_records.emit("eval", label=label, step=step, em=em, seconds=seconds)
        self.console.print(f"held-out EM ({label}): {em:.1f}" if em is not None else f"eval {label}: no EM")
        return em

    def evaluate(self, model_dir: Path, label: str, step: int) -> float | None:
        """Greedy held-out EM (percent) of a model directory; also recorded as an `eval` metric."""
        self.phase = f"eval {label}"
        out = self.paths.evals / f"{label}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        self._command(f"eval-{label}", self._eval_argv(model_dir, out))
        self.eval_seconds = time.monotonic() - started
        return self._record_eval(label, step, out, self.eval_seconds)

    def _checkpoint_snapshot(self, label: str) -> Path | None:
        """The newest complete checkpoint's model, hard-linked (copied where links fail) under eval/models/,
        because the learner prunes old checkpoints while an evaluation may still be reading one."""
        latest = checkpoint.latest(self.paths.checkpoints)
        if latest is None:
            log.warning("no complete checkpoint to evaluate", label=label)
            return None
        snapshot = self.paths.evals / "models" / label
        try:
            if snapshot.exists():
                shutil.rmtree(snapshot)
            shutil.copytree(latest / checkpoint.MODEL_DIR, snapshot, copy_function=_link_or_copy)
        except (OSError, shutil.Error) as error:
            log.warning("checkpoint vanished before it could be evaluated", label=label, error=str(error))
            return None
        return snapshot

    def _evaluate_checkpoint(self, label: str, step: int) -> float | None:
        """Evaluate the newest complete checkpoint's model now; a failure is logged, not fatal."""
        snapshot = self._checkpoint_snapshot(label)
        if snapshot is None:
            return None
        try:
            return self.evaluate(snapshot, label, step)
        except RuntimeError as error:
            log.warning("evaluation failed", label=label, error=str(error))
            self.supervisor_events(f"evaluation {label} failed: {error}")
            return None

    def _start_background_eval(self, label: str, step: int) -> None:
        """Evaluate the newest checkpoint in a process beside the training roles (one torch thread), so the
        supervisor keeps watching the roles meanwhile; `_poll_background_eval` collects it."""
        snapshot = self._checkpoint_snapshot(label)
        if snapshot is None:
            return
        out = self.paths.evals / f"{label}.json"
        argv = self._eval_argv(snapshot, out, "actor.torch_threads=1")
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        with (self.paths.logs / f"eval-{label}.log").open("ab") as handle:
            process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._background_eval = _BackgroundEval(process, label, step, out, time.monotonic())

    def _poll_background_eval(self, stop: bool = False) -> bool:
        """Collect a finished background evaluation (`stop`: end one still running); True while one runs."""
        pending = self._background_eval
        if pending is None:
            return False
        code = pending.process.poll()
        if code is None and not stop:
            return True
        self._background_eval = None
        if code is None:
            pending.process.terminate()
            try:
                pending.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pending.process.kill()
                pending.process.wait()
            self.supervisor_events(f"evaluation {pending.label} cut off: training ended first")
            return False
        if code != 0:
            self.supervisor_events(
                f"evaluation {pending.label} failed (exit {code}); see logs/eval-{pending.label}.log"
            )
            return False
        self._record_eval(pending.label, pending.step, pending.out, time.monotonic() - pending.started)
        return False

    def supervisor_events(self, text: str) -> None:
        if self.supervisor is not None:
            self.supervisor.events.append(f"{time.strftime('%H:%M:%S')} {text}")

    def _role_specs(self, model_dir: Path) -> list[RoleSpec]:
        config, metrics, logs = str(self.paths.config), self.paths.metrics, self.paths.logs
        model = f"model.dir={model_dir}"
        threads = role_threads(available_cores(), self.config.supervisor.actors + self.config.learner.processes)
        actor_threads = [] if self.config.actor.torch_threads else ["--set", f"actor.torch_threads={threads}"]
        learner_threads = [] if self.config.learner.torch_threads else ["--set", f"learner.torch_threads={threads}"]
        specs = [
            RoleSpec(
                "replay",
                self._at2po(
                    "replay", "serve", "--config", config, "--set", f"logging.metrics_path={metrics / 'replay.jsonl'}"
                ),
                logs / "replay.log",
            )
        ]
        for i in range(self.config.supervisor.actors):
            name = f"actor-{i}"
            specs.append(
                RoleSpec(
                    name,
                    self._at2po(
                        "actor",
                        "run",
                        "--config",
                        config,
                        "--set",
                        model,
                        "--set",
                        f"actor.actor_id={name}",
                        "--set",
                        f"actor.seed={self.config.actor.seed + i}",
                        "--set",
                        f"logging.metrics_path={metrics / (name + '.jsonl')}",
                        *actor_threads,
                    ),
                    logs / f"{name}.log",
                )
            )
        learner = self._at2po(
            "learner",
            "run",
            "--config",
            config,
            "--set",
            model,
            "--set",
            f"logging.metrics_path={metrics / 'learner.jsonl'}",
            *learner_threads,
        )
        specs.append(RoleSpec("learner", learner, logs / "learner.log", restart_argv=[*learner, "--resume"]))
        return specs

    def train(self, model_dir: Path) -> str:
        """Run the roles until the budget or Ctrl-C; returns why training stopped."""
        self.phase = "training"
        reserve = SHUTDOWN_RESERVE_S + 1.2 * (self.eval_seconds or 60.0)
        deadline = self.started + self.budget_s - reserve
        supervisor = Supervisor(
            self._role_specs(model_dir), self.config.supervisor.max_restarts, self.config.supervisor.stop_grace_s
        )
        self.supervisor = supervisor
        supervisor.start(["replay"])
        time.sleep(1.0)
        supervisor.start([n for n in supervisor.roles if n != "replay"])
        live_wanted = self.config.supervisor.live
        live_on = self.console.is_terminal if live_wanted is None else live_wanted
        reason = "budget"
        next_log = 0.0
        next_eval_step = self.config.supervisor.eval_every_steps or math.inf
        live = Live(self._view(), console=self.console, refresh_per_second=2) if live_on else None
        try:
            with live if live is not None else contextlib.nullcontext():
                while True:
                    if self.interrupted:
                        reason = "interrupted"
                        break
                    if time.monotonic() >= deadline:
                        break
                    if self.token_budget is not None and self.generated_tokens() >= self.token_budget:
                        reason = "token budget"
                        break
                    supervisor.check()
                    self._write_roles(supervisor)
                    if supervisor.roles["learner"].state == "failed":
                        reason = "learner failed"
                        break
                    self.history.add(self.tail.read_new())
                    step = self.history.learner_steps[-1]["step"] if self.history.learner_steps else 0
                    if not self._poll_background_eval() and step >= next_eval_step:
                        self._start_background_eval(f"step-{step}", step)
                        next_eval_step = step + self.config.supervisor.eval_every_steps
                    if live is not None:
                        live.update(self._view())
                    elif time.monotonic() >= next_log:
                        next_log = time.monotonic() + 30.0
                        log.info("run progress", **_loggable(self.history.snapshot(time.time())))
                    time.sleep(0.5)
        finally:  # whatever ends the loop (an error too), no role outlives the run
            self.phase = "stopping"
            self._poll_background_eval(stop=True)
            self.console.print(f"stopping roles ({reason})")
            supervisor.stop([[n for n in supervisor.roles if n.startswith("actor")], ["learner"], ["replay"]])
            self._write_roles(supervisor)
            self.history.add(self.tail.read_new())
        return reason

    def _write_roles(self, supervisor: Supervisor) -> None:
        """`roles.json`: each role's state, pid and restarts (for operators and the fault tests)."""
        roles = [h.__dict__ for h in supervisor.health()]
        tmp = self.paths.out / "roles.json.tmp"
        tmp.write_text(json.dumps({"phase": self.phase, "roles": roles}) + "\n", encoding="utf-8")
        tmp.replace(self.paths.out / "roles.json")

    def generated_tokens(self) -> int:
        return int(sum(float(t.get("generated_tokens", 0)) for t in self.history.trees))

    def _view(self) -> Any:
        health = self.supervisor.health() if self.supervisor else []
        events = self.supervisor.events if self.supervisor else []
        figures = self.history.snapshot(time.time())
        figures["elapsed_s"] = self.elapsed()
        return render(self.phase, self.budget_s, figures, health, self.em_warmstart, events)

    # ------------------------------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        previous = signal.signal(signal.SIGINT, self._on_interrupt)
        previous_term = signal.signal(signal.SIGTERM, self._on_interrupt)
        stopped_by = "budget"
        try:
            self.ensure_model()
            model_dir = self.warm_start()
            if self.em_warmstart is None:
                self.em_warmstart = self.evaluate(model_dir, "warmstart", 0)
            else:
                self.eval_records.emit("eval", label="warmstart", step=0, em=self.em_warmstart, seconds=0.0)
            stopped_by = self.train(model_dir) if not self.interrupted else "interrupted"
            if not self.interrupted:
                step = self.history.learner_steps[-1]["step"] if self.history.learner_steps else 0
                self.em_final = self._evaluate_checkpoint("final", step)
        finally:
            signal.signal(signal.SIGINT, previous)
            signal.signal(signal.SIGTERM, previous_term)
            self.eval_records.close()
            self.history.add(self.tail.read_new())
            summary = self.summary(stopped_by)
            self.paths.summary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        from ops.report import write_report

        write_report(self.paths.out)
        return summary

    def _on_interrupt(self, _signum: int, _frame: FrameType | None) -> None:
        self.interrupted = True

    def summary(self, stopped_by: str) -> dict[str, Any]:
        history = self.history
        steps = history.learner_steps
        span = (float(history.trees[-1]["ts"]) - float(history.trees[0]["ts"])) if len(history.trees) > 1 else 0.0
        tokens = sum(float(t.get("generated_tokens", 0)) for t in history.trees)
        staleness = history.staleness()
        return {
            "em_warmstart": self.em_warmstart,
            "em_final": self.em_final,
            "em_gain": (self.em_final - self.em_warmstart)
            if self.em_final is not None and self.em_warmstart is not None
            else None,
            "minutes": round(self.elapsed() / 60.0, 2),
            "stopped_by": stopped_by,
            "learner_steps": steps[-1]["step"] if steps else 0,
            "final_version": steps[-1]["version"] if steps else 0,
            "trees_done": len(history.trees),
            "generated_tokens": self.generated_tokens(),
            "trees_per_s": len(history.trees) / span if span > 0 else None,
            "generated_tokens_per_s": tokens / span if span > 0 else None,
            "learner_busy_fraction": _finite(history.learner_busy_fraction()),
            "staleness_mean": _finite(staleness["mean"]),
            "staleness_max": _finite(staleness["max"]),
            "restarts": {h.name: h.restarts for h in self.supervisor.health()} if self.supervisor else {},
            "events": self.supervisor.events if self.supervisor else [],
            "out_dir": str(self.paths.out),
        }


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def headline_em(report: dict[str, Any]) -> float | None:
    """The size-weighted mean EM (percent) of an `at2po eval` report (AT²PO's convention)."""
    for key in ("em_weighted_by_size", "em", "em_mean_of_sources"):
        value = report.get(key)
        if isinstance(value, int | float):
            return float(value)
    overall = report.get("overall")
    if isinstance(overall, dict):
        return headline_em(overall)
    return None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _loggable(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items() if v is not None}
