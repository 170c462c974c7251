"""`at2po run` end to end on a tiny budget, and the faults it must survive (kill -9 of every role)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import at2po

pytestmark = pytest.mark.slow

SUMMARY_KEYS = {
    "em_warmstart",
    "em_final",
    "em_gain",
    "minutes",
    "stopped_by",
    "learner_steps",
    "final_version",
    "trees_done",
    "generated_tokens",
    "trees_per_s",
    "generated_tokens_per_s",
    "learner_busy_fraction",
    "staleness_mean",
    "staleness_max",
    "restarts",
}


def tiny_run_args(tmp_path: Path, minutes: float) -> list[str]:
    """A run small enough for CI: a few demonstrations, small trees, a handful of held-out tasks."""
    settings = {
        "model.dir": tmp_path / "model",
        "model.init_copy_steps": 20,
        "sft.out_dir": tmp_path / "warmstart",
        "sft.n_demos": 40,
        "sft.epochs": 1,
        "sft.demo_worlds": 2,
        "tasks.data_dir": tmp_path / "world",
        "tasks.n_train": 60,
        "tasks.n_test": 8,
        "supervisor.eval_limit": 8,
        "supervisor.max_minutes": minutes,
        "supervisor.live": "false",
        "supervisor.stop_grace_s": 30,
        "tree.at2po_initial_chains": 3,
        "tree.at2po_rounds": 1,
        "tree.at2po_expansions": 2,
        "tree.max_new_tokens": 24,
        "env.max_turns": 2,
        "replay.trees_per_step": 2,
        "replay.max_staleness": 1,
        "learner.checkpoint_every": 1,
        "learner.torch_threads": 1,
        "actor.torch_threads": 1,
        "actor.concurrent_tasks": 2,
        "actor.seed": 3,
    }
    args = ["run", "--out", str(tmp_path / "run")]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args


def check_run_outputs(run: Path, stdout: str) -> dict[str, object]:
    """The files and keys every finished run leaves, whatever happened during it."""
    summary = json.loads((run / "summary.json").read_text())
    assert summary.keys() >= SUMMARY_KEYS
    assert summary["learner_steps"] >= 1 and summary["trees_done"] >= 2
    assert 0.0 <= summary["em_warmstart"] <= 100.0 and 0.0 <= summary["em_final"] <= 100.0
    for name in (
        "config.toml",
        "report.md",
        "report.html",
        "reward_em.png",
        "entropy.png",
        "staleness.png",
        "throughput.png",
        "busy.png",
        "eval/warmstart.json",
        "eval/final.json",
        "roles.json",
    ):
        assert (run / name).is_file(), name
    for role in ("replay", "actor-0", "actor-1", "learner"):
        assert (run / "metrics" / f"{role}.jsonl").is_file(), role
    assert json.loads(stdout.strip().splitlines()[-1]) == summary
    # The same config file starts a role by hand.
    shown = subprocess.run([*at2po(), "config", "show", "--config", str(run / "config.toml")], capture_output=True)
    assert shown.returncode == 0
    return summary


def roles(run: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads((run / "roles.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return {r["name"]: r for r in data["roles"]}


def wait_for(condition, timeout: float, what: str, run: Path | None = None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}" + (explain(run) if run else "")
        time.sleep(0.5)


def explain(run: Path) -> str:
    """What a failed wait needs for a diagnosis on a CI machine: the roles' states and their logs' tails."""
    parts = [f"\n--- roles.json\n{json.dumps(roles(run), indent=1)}"]
    for log in sorted((run / "logs").glob("*.log")):
        parts.append(f"--- {log.name} (tail)\n{log.read_text(errors='replace')[-2500:]}")
    return "\n".join(parts)


def learner_steps(run: Path) -> list[dict[str, object]]:
    path = run / "metrics" / "learner.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("name") == "learner_step"]


@pytest.mark.timeout(900)
def test_short_run_survives_kill_9_of_every_role_and_reports(tmp_path: Path) -> None:
    """One short `at2po run` (CI time is scarce): every role is killed once; it still trains, evaluates,
    and writes its summary and report."""
    run = tmp_path / "run"
    process = subprocess.Popen(
        [*at2po(), *tiny_run_args(tmp_path, 7.0)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: len(learner_steps(run)) >= 2, 360, "two learner steps", run)
        for name in ("actor-0", "learner", "replay"):
            before = roles(run)[name]
            os.kill(int(before["pid"]), signal.SIGKILL)
            wait_for(
                lambda n=name, r=before["restarts"]: (
                    roles(run).get(n, {}).get("restarts") == r + 1 and roles(run)[n]["state"] == "running"
                ),
                60,
                f"{name} restarted",
                run,
            )
            steps_now = len(learner_steps(run))
            wait_for(
                lambda s=steps_now: len(learner_steps(run)) > s, 180, f"training going on after killing {name}", run
            )
        out, err = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
    assert process.returncode == 0, err[-3000:]
    summary = check_run_outputs(run, out)
    assert summary["minutes"] <= 7.5
    assert summary["restarts"] == {"replay": 1, "actor-0": 1, "actor-1": 0, "learner": 1}

    steps = learner_steps(run)
    versions = [int(s["version"]) for s in steps]
    # The learner resumed from its checkpoint (written every step) with its version: the counter never
    # restarts; at most the step it was killed in is done again.
    assert versions[0] == 1
    assert all(b - a in (0, 1) for a, b in itertools.pairwise(versions)), versions
    assert max(versions) == summary["final_version"]
    assert all(s["staleness_max"] is None or s["staleness_max"] <= 1 for s in steps)
    # The learner, beside replay, read every sample from the store itself (counts restart with the learner).
    assert steps[-1]["samples_by_reference"] >= 1
    assert all(s["reference_fallbacks"] == 0 for s in steps)

    # Every acked subtree is in the store exactly once.
    export = tmp_path / "trees.parquet"
    done = subprocess.run(
        [*at2po(), "replay", "export", "--dir", str(run / "replay"), "--out", str(export), "--include-growing"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    import pyarrow.parquet as pq

    table = pq.read_table(export).to_pydict()
    keys = list(zip(table["tree_id"], table["node_id"], strict=True))
    assert len(keys) == len(set(keys))
