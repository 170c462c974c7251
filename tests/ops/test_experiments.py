"""Sweep bookkeeping, tables and plots, with each run replaced by a recorded one (the real runs are slow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest

from common.config import load_config
from ops import experiments
from ops.experiments import (
    compare_table,
    compare_variants,
    minutes_to_target,
    plot_compare,
    plot_staleness,
    run_sweep,
    staleness_table,
    staleness_variants,
    variant_curves,
    with_overrides,
)


class RecordedRun:
    """Writes the metrics a run of this variant would leave: EM rises faster with more staleness."""

    calls: ClassVar[list[dict[str, Any]]] = []
    interrupt_at: ClassVar[int | None] = None  # the max staleness whose run is stopped by Ctrl-C

    def __init__(self, config: Any, out_dir: Path, token_budget: int | None = None, em_warmstart: float | None = None):
        self.config, self.out, self.token_budget, self.em_warmstart = config, out_dir, token_budget, em_warmstart

    def run(self) -> dict[str, Any]:
        RecordedRun.calls.append({"out": self.out.name, "em_warmstart": self.em_warmstart, "budget": self.token_budget})
        staleness = self.config.replay.max_staleness
        metrics = self.out / "metrics"
        metrics.mkdir(parents=True)
        lines = [
            {
                "ts": 1000.0 + 60 * i,
                "name": "learner_step",
                "step": i,
                "version": i,
                "trees": 4,
                "update_seconds": 30.0 + 5 * staleness,
                "kl_behav_k3": 0.01 * staleness,
            }
            for i in range(1, 6)
        ]
        (metrics / "learner.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        evals = [
            {"ts": 1000.0, "name": "eval", "label": "warmstart", "step": 0, "em": 20.0},
            {"ts": 1180.0, "name": "eval", "label": "mid", "step": 3, "em": 20.0 + 4 * staleness},
        ]
        (metrics / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
        seed = self.config.learner.seed
        return {
            "stopped_by": "interrupted" if staleness == RecordedRun.interrupt_at else "budget",
            "em_warmstart": 20.0,
            "em_final": 22.0 + staleness + seed,
            "minutes": 5.0,
            "trees_done": 20,
            "generated_tokens": 1000 + seed,
        }


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    RecordedRun.calls = []
    RecordedRun.interrupt_at = None
    monkeypatch.setattr(experiments, "LocalRun", RecordedRun)


def test_variants() -> None:
    names = [v.name for v in staleness_variants([0, 4], [1, 2])]
    assert names == ["staleness0-actors1", "staleness4-actors1", "staleness0-actors2", "staleness4-actors2"]
    compare = compare_variants(["chain", "at2po"], [0, 1])
    assert compare[0].overrides["tree.builder"] == "chain" and compare[0].overrides["learner.credit"] == "grpo"
    assert compare[3].overrides["learner.seed"] == 1 and compare[3].group == "at2po"
    with pytest.raises(ValueError, match="unknown algorithm"):
        compare_variants(["ppo-chain"], [0])
    config = with_overrides(load_config(None), {"replay.max_staleness": 0, "tree.builder": "chain"})
    assert config.replay.max_staleness == 0 and config.tree.builder == "chain"


def test_staleness_sweep_table_and_plot(recorded: None, tmp_path: Path) -> None:
    variants = staleness_variants([0, 1, 4], [2])
    result = run_sweep(load_config(None), variants, tmp_path)
    # The first run evaluates the warm start; the others reuse its EM.
    assert [c["em_warmstart"] for c in RecordedRun.calls] == [None, 20.0, 20.0]
    rows = staleness_table(result, tmp_path, target_gain=10.0)
    assert [r["minutes_to_target"] for r in rows] == [None, None, 3.0]  # only staleness 4 reaches 30 EM (at 3 min)
    assert rows[2]["learner_busy_fraction"] == pytest.approx(50.0 * 4 / 240.0)
    assert rows[1]["kl_behav_k3_mean"] == pytest.approx(0.01)
    assert plot_staleness(result, tmp_path).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["summaries"]) == {v.name for v in variants}


def test_ctrl_c_in_one_variant_ends_the_sweep_with_what_was_done(recorded: None, tmp_path: Path) -> None:
    RecordedRun.interrupt_at = 1
    result = run_sweep(load_config(None), staleness_variants([0, 1, 4], [2]), tmp_path)
    assert [c["out"] for c in RecordedRun.calls] == ["staleness0-actors2", "staleness1-actors2"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["summaries"]) == list(result.summaries) == ["staleness0-actors2", "staleness1-actors2"]


def test_compare_table_over_seeds(recorded: None, tmp_path: Path) -> None:
    variants = compare_variants(["chain", "at2po"], [0, 2])
    result = run_sweep(load_config(None), variants, tmp_path, token_budget=5000)
    assert {c["budget"] for c in RecordedRun.calls} == {5000}
    rows = compare_table(result)
    assert [r["algorithm"] for r in rows] == ["chain", "at2po"]
    assert rows[0]["em_final_mean"] == pytest.approx(27.0)  # default staleness 4: 22 + 4 + mean of seeds 0, 2
    assert rows[0]["em_final_std"] == pytest.approx(1.0)
    assert plot_compare(rows, tmp_path).read_bytes()[:4] == b"\x89PNG"


def test_curves_and_target(tmp_path: Path) -> None:
    curve = {"minutes": [0.0, 2.0, 4.0], "em": [10.0, 15.0, 21.0], "trees": [0, 8, 16]}
    assert minutes_to_target(curve, 20.0) == 4.0
    assert minutes_to_target(curve, 30.0) is None
    (tmp_path / "metrics").mkdir()
    assert variant_curves(tmp_path)["em"] == []


def test_experiments_without_a_config_run_the_embedded_default(recorded: None, tmp_path: Path) -> None:
    seen: list[Any] = []

    def fake_sweep(config: Any, variants: Any, out: Path, token_budget: int | None = None) -> Any:
        seen.append(config)
        return experiments.SweepResult(list(variants))

    from typer.testing import CliRunner

    from ops.cli import app

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiments, "run_sweep", fake_sweep)
        patch.setattr(experiments, "staleness_table", lambda *args: [])
        patch.setattr(experiments, "plot_staleness", lambda *args: None)
        runner = CliRunner()
        out = tmp_path / "sweep"
        out.mkdir()
        done = runner.invoke(app, ["experiment", "staleness", "--values", "0", "--minutes", "2", "--out", str(out)])
        assert done.exit_code == 0, done.output
        config_file = tmp_path / "run.toml"
        config_file.write_text("[replay]\ntrees_per_step = 3\n")
        args = ["experiment", "staleness", "--values", "0", "--out", str(out), "--config", str(config_file)]
        assert runner.invoke(app, args).exit_code == 0
    embedded, configured = seen
    # the same settings `at2po run` uses without --config; a config file replaces them
    assert (embedded.replay.trees_per_step, embedded.tree.max_new_tokens) == (8, 96)
    assert embedded.supervisor.max_minutes == 2.0
    assert configured.replay.trees_per_step == 3 and configured.tree.max_new_tokens != 96
