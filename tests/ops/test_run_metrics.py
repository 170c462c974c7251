"""Metrics files are read incrementally (partial lines kept), and the report draws every plot."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from common.config import load_config
from ops.local_run import LocalRun, RunPaths, _BackgroundEval, headline_em, resolve_run_config, role_threads
from ops.report import PLOTS, write_report
from ops.roles import RoleSpec, Supervisor
from ops.run_metrics import MetricsTail, RunHistory


def record(ts: float, name: str, **fields: object) -> str:
    return json.dumps({"ts": ts, "role": "x", "name": name, **fields}) + "\n"


def test_tail_reads_only_new_complete_lines(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    path = metrics / "learner.jsonl"
    path.write_text(record(1.0, "learner_step", step=1) + '{"ts": 2.0, "na')
    tail = MetricsTail(metrics)
    first = tail.read_new()
    assert [r["step"] for r in first] == [1] and first[0]["source"] == "learner"
    with path.open("a") as handle:
        handle.write('me": "learner_step", "step": 2}\nnot json\n')
    second = tail.read_new()
    assert [r["step"] for r in second] == [2]
    assert tail.bad_lines == 1
    assert tail.read_new() == []


def synthetic_run(run: Path) -> None:
    metrics = run / "metrics"
    metrics.mkdir(parents=True)
    lines = []
    for step in range(1, 6):
        lines.append(
            record(
                100.0 + 10 * step,
                "learner_step",
                step=step,
                version=step,
                reward_mean=-1 + 0.1 * step,
                policy_entropy=3.0 - 0.1 * step,
                turn_kl_entropy=0.7,
                tokens_per_s=500.0,
                update_seconds=6.0,
                staleness_counts={"0": 2, "1": 1},
            )
        )
    (metrics / "learner.jsonl").write_text("".join(lines))
    trees = [record(100.0 + 5 * i, "tree", generated_tokens=100) for i in range(10)]
    (metrics / "actor-0.jsonl").write_text("".join(trees))
    evals = [
        record(100.0, "eval", label="warmstart", step=0, em=10.0),
        record(160.0, "eval", label="final", step=5, em=25.0),
    ]
    (metrics / "eval.jsonl").write_text("".join(evals))


def test_history_figures(tmp_path: Path) -> None:
    synthetic_run(tmp_path)
    history = RunHistory()
    history.add(MetricsTail(tmp_path / "metrics").read_new())
    assert history.learner_busy_fraction() == 24.0 / 40.0  # steps 2..5: 4 x 6 s over 40 s
    assert history.staleness() == {"mean": 5 / 15, "max": 1.0}
    figures = history.snapshot(now=150.0)
    assert figures["learner_step"] == 5 and figures["heldout_em"] == 25.0
    assert figures["trees_done"] == 10
    assert figures["trees_per_s"] == 10 / 50.0  # all 10 trees within the 60 s window, run 50 s old


def test_report_draws_every_plot(tmp_path: Path) -> None:
    synthetic_run(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"em_warmstart": 10.0, "em_final": 25.0, "restarts": {}}))
    md = write_report(tmp_path)
    for name in PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in md.read_text()
    assert "| em_final | 25 |" in md.read_text()
    assert "<img src='busy.png'" in (tmp_path / "report.html").read_text()


def test_report_of_an_empty_run_still_draws(tmp_path: Path) -> None:
    (tmp_path / "metrics").mkdir()
    write_report(tmp_path)
    assert all((tmp_path / name).is_file() for name in PLOTS)


def test_run_config_gets_local_paths_and_free_ports(tmp_path: Path) -> None:
    config = resolve_run_config(load_config(None), RunPaths(tmp_path))
    assert config.replay.dir == str(tmp_path / "replay")
    assert config.learner.checkpoint_dir == str(tmp_path / "learner")
    endpoints = {
        config.transport.replay_endpoint,
        config.transport.weights_endpoint,
        config.transport.weights_pub_endpoint,
    }
    assert len(endpoints) == 3 and "tcp://127.0.0.1:5555" not in endpoints
    fixed = resolve_run_config(
        load_config(None, ["transport.replay_endpoint=tcp://127.0.0.1:7777"]), RunPaths(tmp_path)
    )
    assert fixed.transport.replay_endpoint == "tcp://127.0.0.1:7777"


def test_role_threads_split_the_cores_between_torch_processes() -> None:
    assert [role_threads(2, n) for n in (1, 2, 3)] == [2, 1, 1]
    assert role_threads(16, 3) == 5 and role_threads(4, 0) == 4


def argv_sets(spec: RoleSpec) -> list[str]:
    return [spec.argv[i + 1] for i, arg in enumerate(spec.argv) if arg == "--set"]


def test_roles_get_a_share_of_the_cores_unless_the_config_names_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ops.local_run.available_cores", lambda: 8)
    run = LocalRun(load_config(None, ["supervisor.actors=3"]), tmp_path / "run", console=Console(file=io.StringIO()))
    specs = {spec.name: spec for spec in run._role_specs(tmp_path / "model")}
    for name in ("actor-0", "actor-1", "actor-2"):
        assert "actor.torch_threads=2" in argv_sets(specs[name])  # 8 cores over 3 actors + 1 learner
    assert "learner.torch_threads=2" in argv_sets(specs["learner"])
    assert not any("torch_threads" in arg for arg in argv_sets(specs["replay"]))
    named = LocalRun(
        load_config(None, ["actor.torch_threads=3"]), tmp_path / "named", console=Console(file=io.StringIO())
    )
    specs = {spec.name: spec for spec in named._role_specs(tmp_path / "model")}
    assert not any("torch_threads" in arg for arg in argv_sets(specs["actor-0"]))  # the config's 3 applies
    assert "learner.torch_threads=2" in argv_sets(specs["learner"])  # 8 cores over 2 actors + 1 learner


def background(run: LocalRun, code: str, label: str) -> Path:
    out = run.paths.evals / f"{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([sys.executable, "-c", code, str(out)])
    run._background_eval = _BackgroundEval(process, label, 5, out, time.monotonic())
    return out


def test_a_background_evaluation_is_collected_when_done_and_cut_off_at_the_end(tmp_path: Path) -> None:
    run = LocalRun(load_config(None), tmp_path / "run", console=Console(file=io.StringIO()))
    run.supervisor = Supervisor([], max_restarts=0, grace_s=1.0)
    background(run, "import json, sys; json.dump({'em_weighted_by_size': 12.5}, open(sys.argv[1], 'w'))", "step-5")
    deadline = time.monotonic() + 30
    while run._poll_background_eval():  # the training loop keeps supervising meanwhile
        assert time.monotonic() < deadline
        time.sleep(0.05)
    records = [json.loads(line) for line in (run.paths.metrics / "eval.jsonl").read_text().splitlines()]
    assert [(r["label"], r["step"], r["em"]) for r in records] == [("step-5", 5, 12.5)]
    slow = background(run, "import time; time.sleep(60)", "step-10")
    assert run._poll_background_eval()  # still running
    assert not run._poll_background_eval(stop=True)  # training ended: it is stopped, not waited for
    assert not slow.exists() and any("step-10 cut off" in event for event in run.supervisor.events)
    background(run, "import sys; sys.exit(3)", "step-15")
    run._background_eval.process.wait()
    assert not run._poll_background_eval()
    assert any("step-15 failed (exit 3)" in event for event in run.supervisor.events)


def test_headline_em_prefers_the_size_weighted_mean() -> None:
    assert headline_em({"em_mean_of_sources": 20.0, "em_weighted_by_size": 30.0}) == 30.0
    assert headline_em({"overall": {"em_weighted_by_size": 12.5}}) == 12.5
    assert headline_em({}) is None
