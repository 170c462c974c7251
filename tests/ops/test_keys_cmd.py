"""`at2po keys gen` writes a usable key pair and never overwrites one."""

from __future__ import annotations

import stat
from pathlib import Path

import zmq.auth
from typer.testing import CliRunner

from ops.keys_cmd import keys_app

runner = CliRunner()


def test_gen_writes_pair_and_prints_paths(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    result = runner.invoke(keys_app, ["gen", "--out", str(out), "--name", "replay"])
    assert result.exit_code == 0, result.output
    public, secret = out / "replay.key", out / "replay.key_secret"
    assert str(public) in result.output and str(secret) in result.output
    assert "authorized_keys_dir" in result.output
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    public_key, no_secret = zmq.auth.load_certificate(public)
    same_public, secret_key = zmq.auth.load_certificate(secret)
    assert no_secret is None and secret_key is not None
    assert public_key == same_public and len(public_key) == 40  # z85 of 32 bytes


def test_gen_refuses_to_overwrite(tmp_path: Path) -> None:
    args = ["gen", "--out", str(tmp_path), "--name", "actor-0"]
    assert runner.invoke(keys_app, args).exit_code == 0
    before = (tmp_path / "actor-0.key_secret").read_bytes()
    result = runner.invoke(keys_app, args)
    assert result.exit_code == 1
    assert "already exists" in result.output
    assert (tmp_path / "actor-0.key_secret").read_bytes() == before


def test_gen_rejects_path_like_name(tmp_path: Path) -> None:
    result = runner.invoke(keys_app, ["gen", "--out", str(tmp_path), "--name", "../x"])
    assert result.exit_code == 2
    assert not (tmp_path.parent / "x.key").exists()


def test_gen_requires_name_and_out(tmp_path: Path) -> None:
    assert runner.invoke(keys_app, ["gen", "--out", str(tmp_path)]).exit_code == 2
    assert runner.invoke(keys_app, ["gen", "--name", "x"]).exit_code == 2
    assert list(tmp_path.iterdir()) == []
