"""`at2po model init-tiny` and `at2po model info` through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from actors.policy_model import load_policy, policy_fingerprint
from ops.model_cmd import model_app

runner = CliRunner()


def test_init_tiny_then_info(tmp_path: Path) -> None:
    out = tmp_path / "llama"
    args = ["init-tiny", "--out", str(out), "--arch", "llama", "--hidden", "64", "--heads", "2", "--kv-heads", "1"]
    result = runner.invoke(model_app, [*args, "--vocab", "1024", "--seed", "5", "--copy-steps", "0"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    policy = load_policy(out)
    assert summary["architecture"] == "llama"
    assert summary["head_dim"] == 32
    assert summary["parameters"] == policy.num_parameters
    assert summary["vocab_size"] == len(policy.tokenizer) <= 1024
    assert {"config.json", "model.safetensors", "tokenizer.json", "tiny_model.json"} <= set(summary["files"])
    assert summary["init_s"] > 0
    assert summary["copy_pretraining"] is None

    result = runner.invoke(model_app, ["info", "--dir", str(out)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["parameters"] == summary["parameters"]
    assert info["vocab_size"] == info["model_vocab_size"] == summary["vocab_size"]
    assert (info["hidden_size"], info["layers"], info["heads"], info["kv_heads"], info["head_dim"]) == (64, 2, 2, 1, 32)
    assert "<|im_end|>" in info["special_tokens"]
    assert info["tags_single_token"] is True
    assert info["fingerprint"] == policy_fingerprint(policy)

    result = runner.invoke(model_app, [*args, "--vocab", "1024"])
    assert result.exit_code == 2
    assert "--force" in result.output


def test_init_tiny_rejects_a_head_dim_vllm_cannot_run(tmp_path: Path) -> None:
    result = runner.invoke(model_app, ["init-tiny", "--out", str(tmp_path / "m"), "--hidden", "64", "--heads", "4"])
    assert result.exit_code == 2
    assert "head_dim" in result.output
    assert not (tmp_path / "m").exists()


def test_info_on_a_missing_directory_exits_1(tmp_path: Path) -> None:
    result = runner.invoke(model_app, ["info", "--dir", str(tmp_path / "absent")])
    assert result.exit_code == 1
    assert "absent" in result.output


def test_init_tiny_copy_pretrains_and_records_it(tmp_path: Path) -> None:
    args = ["init-tiny", "--arch", "llama", "--hidden", "64", "--heads", "2", "--kv-heads", "1", "--vocab", "1024"]
    plain, pretrained = tmp_path / "plain", tmp_path / "pretrained"
    assert runner.invoke(model_app, [*args, "--out", str(plain), "--copy-steps", "0"]).exit_code == 0
    result = runner.invoke(model_app, [*args, "--out", str(pretrained), "--copy-steps", "20"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["copy_pretraining"]
    assert report["steps"] == 20 and report["seconds"] > 0
    assert report["first_loss"] > 0 and report["last_loss"] > 0 and 0 <= report["copy_accuracy"] <= 1
    manifest = json.loads((pretrained / "tiny_model.json").read_text(encoding="utf-8"))
    assert manifest["copy_pretraining"] == report
    # the same tokenizer and starting weights, then 20 optimizer steps: different weights, loadable as a policy
    assert (plain / "tokenizer.json").read_bytes() == (pretrained / "tokenizer.json").read_bytes()
    assert policy_fingerprint(load_policy(plain)) != policy_fingerprint(load_policy(pretrained))


def test_the_cli_default_copy_steps_are_the_curriculum_default() -> None:
    from learner.copy_pretraining import CopyCurriculum
    from ops.model_cmd import DEFAULT_COPY_STEPS

    assert CopyCurriculum.steps == DEFAULT_COPY_STEPS


def test_copy_spans_are_drawn_from_multi_byte_tokens_only(tmp_path: Path) -> None:
    from learner.copy_pretraining import SEPARATOR, tokenizer_vocabulary

    out = tmp_path / "m"
    args = ["init-tiny", "--out", str(out), "--hidden", "64", "--heads", "2", "--kv-heads", "1", "--vocab", "1024"]
    assert runner.invoke(model_app, [*args, "--copy-steps", "0"]).exit_code == 0
    tokenizer = load_policy(out).tokenizer
    vocabulary = tokenizer_vocabulary(tokenizer)
    drawn = set(vocabulary.ordinary_ids.tolist())
    tokens = tokenizer.convert_ids_to_tokens(sorted(drawn))
    assert tokenizer.convert_ids_to_tokens(vocabulary.separator_id) == SEPARATOR
    assert vocabulary.separator_id not in drawn
    assert not drawn & set(tokenizer.all_special_ids)
    assert not drawn & set(tokenizer.get_added_vocab().values())  # no protocol tag
    assert all(len(token) > 1 for token in tokens)
    assert len(drawn) > len(tokenizer) // 2
