"""The learner as a process: trains from a real replay filled by a scripted actor, checkpoints, resumes on 2 ranks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from learner import checkpoint
from tests.learner.trees import save_tiny_policy
from tests.support import at2po, free_endpoint

pytestmark = pytest.mark.slow

SCRIPTED_ACTOR = Path(__file__).with_name("scripted_actor.py")
REPO = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, model_dir: Path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(
        f"""
[transport]
replay_endpoint = "{free_endpoint()}"
weights_pub_endpoint = "{free_endpoint()}"
weights_endpoint = "{free_endpoint()}"

[replay]
dir = "{tmp_path / "replay"}"
map_size_gb = 0.2
capacity_bytes = 100000000
trees_per_step = 4
max_staleness = 1

[logging]
level = "warning"
metrics_path = "{tmp_path / "metrics.jsonl"}"

[model]
dir = "{model_dir}"

[learner]
lr = 0.003
max_steps = 12
checkpoint_dir = "{tmp_path / "checkpoints"}"
checkpoint_every = 5
torch_threads = 1
sample_timeout_s = 120
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def replay(tmp_path: Path) -> Iterator[Path]:
    config = write_config(tmp_path, save_tiny_policy(tmp_path / "model"))
    process = subprocess.Popen([*at2po(), "replay", "serve", "--config", str(config)], text=True)
    try:
        yield config
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def run_pair(config: Path, rewards: Path, n_trees: int, *learner_args: str) -> dict[str, object]:
    """Run the learner and the scripted actor together; both must exit 0. Returns the learner's summary."""
    learner = subprocess.Popen(
        [*at2po(), "learner", "run", "--config", str(config), *learner_args], stdout=subprocess.PIPE, text=True
    )
    actor = subprocess.Popen([sys.executable, str(SCRIPTED_ACTOR), str(config), str(rewards), str(n_trees)], cwd=REPO)
    try:
        out, _ = learner.communicate(timeout=240)
        assert learner.returncode == 0
        assert actor.wait(timeout=60) == 0
    finally:
        for process in (learner, actor):
            if process.poll() is None:
                process.kill()
    return json.loads(out.strip().splitlines()[-1])


def steps(tmp_path: Path) -> list[dict[str, object]]:
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["name"] == "learner_step"]


def test_learner_trains_from_replay_then_resumes_on_two_ranks(replay: Path, tmp_path: Path) -> None:
    summary = run_pair(replay, tmp_path / "rewards.jsonl", 48)
    assert summary == {"steps": 12, "version": 12, "trees_trained": 48, "stopped_by": "max_steps"}

    rewards = [json.loads(line) for line in (tmp_path / "rewards.jsonl").read_text().splitlines()]
    first = [r["reward"] for r in rewards[:8]]
    last = [r["reward"] for r in rewards[-8:]]
    # About 10% of tokens are "good" by chance; the trained policy must clearly beat its start.
    assert sum(last) / 8 > sum(first) / 8 + 0.05, (first, last)
    assert rewards[-1]["version"] >= 10  # the actor really sampled from published weights

    records = steps(tmp_path)
    assert [r["version"] for r in records] == list(range(1, 13))
    assert all(r["staleness_max"] <= 1 for r in records)  # replay's bound, as the learner saw it
    for key in ("loss", "clip_fraction", "is_weight_mean", "policy_entropy", "kl_behav_k3", "grad_norm"):
        assert all(key in r for r in records), key

    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "checkpoints")] == ["v00000010", "v00000012"]
    exported = tmp_path / "checkpoints" / "v00000012" / checkpoint.MODEL_DIR
    trained = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tmp_path / "model", local_files_only=True).state_dict()
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)

    resumed = run_pair(
        replay,
        tmp_path / "rewards2.jsonl",
        8,
        "--resume",
        "--set",
        "learner.max_steps=14",
        "--set",
        "learner.processes=2",
    )
    assert resumed == {"steps": 2, "version": 14, "trees_trained": 56, "stopped_by": "max_steps"}
    records = steps(tmp_path)
    assert [r["version"] for r in records[12:]] == [13, 14]
    assert all(r["staleness_max"] <= 1 for r in records[12:])
    assert checkpoint.latest(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "v00000014"
    versions = [json.loads(line)["version"] for line in (tmp_path / "rewards2.jsonl").read_text().splitlines()]
    assert min(versions) >= 12  # after the resume the actor only ever saw the continued version counter


def test_learner_without_trees_says_what_it_waits_for_and_stops_cleanly(replay: Path, tmp_path: Path) -> None:
    stalled = subprocess.run(
        [*at2po(), "learner", "run", "--config", str(replay), "--set", "learner.sample_timeout_s=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stalled.returncode == 3
    assert "4 completed tree(s) at version 0" in stalled.stderr
    assert "last reason" in stalled.stderr

    learner = subprocess.Popen(
        [*at2po(), "learner", "run", "--config", str(replay), "--set", "logging.level=info"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert learner.stderr is not None
        for line in learner.stderr:  # wait until it is really waiting on replay
            if "waiting for trees" in line:
                break
        learner.send_signal(signal.SIGTERM)
        out, _ = learner.communicate(timeout=60)
    finally:
        if learner.poll() is None:
            learner.kill()
    assert learner.returncode == 0
    assert json.loads(out.strip().splitlines()[-1])["stopped_by"] == "signal"
    assert checkpoint.latest(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "v00000000"


@pytest.mark.parametrize(
    "override, message",
    [
        ("learner.loss=nope", "unknown policy loss 'nope'"),
        ("learner.credit=nope", "unknown credit method 'nope'"),
        ("learner.zero_stage=3", "learner.zero_stage"),
        ("learner.lr=-1", "learner.lr"),
    ],
)
def test_bad_learner_config_is_refused(replay: Path, override: str, message: str) -> None:
    result = subprocess.run(
        [*at2po(), "learner", "run", "--config", str(replay), "--set", override],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert message in result.stderr
