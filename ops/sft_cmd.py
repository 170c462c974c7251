"""`at2po sft ...`: the warm start: make demonstrations, fine-tune the policy on them.

- `at2po sft demos [--config F] [--set k=v] [--out FILE] [--n N]` writes demonstrations (JSONL, format in
  `ops.demos`) made from the synthetic world's training split and prints one JSON line of counts.
- `at2po sft run [--config F] [--set k=v] [--demos FILE] [--out DIR]` reads `--demos` (else `sft.demos`;
  when both are unset it makes `sft.n_demos` demonstrations first, written beside the output as
  `<out>-demos.jsonl`), tokenises them as the actor lays out a conversation (`ops.sft_data`), holds out
  `sft.holdout_fraction` of the tasks, trains (`learner.sft`), writes the model directory and prints one
  JSON line: n_demos, n_tokens, epochs, steps, heldout_loss_before, heldout_loss_after, train_loss_first,
  train_loss_last, seconds, out_dir (plus a few counts). Logs go to stderr; stdout holds only the JSON.
Bad configuration or unusable demonstrations exit 2 with the reason.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from common.config import ConfigError, RunConfig
from common.log import configure_logging, get_logger
from ops.replay_cmd import ConfigOption, SetOption, load_or_exit

sft_app = typer.Typer(help="Warm start: supervised fine-tuning on demonstrations.", no_args_is_help=True)
log = get_logger("ops.sft")


@sft_app.callback()
def _group() -> None:
    """Warm start (supervised fine-tuning on demonstrations)."""


def default_demos_path(out_dir: str | Path) -> Path:
    """Where made demonstrations go: beside the model directory, never inside it (checkpoints copy its files)."""
    out = Path(out_dir)
    return out.with_name(f"{out.name}-demos.jsonl")


def _max_tokens(config: RunConfig) -> int | None:
    """The longest sequence the policy takes: its position limit and `tree.max_context_tokens`."""
    limits: list[int] = []
    try:
        model = json.loads((Path(config.model.dir) / "config.json").read_text(encoding="utf-8"))
        if isinstance(model.get("max_position_embeddings"), int):
            limits.append(model["max_position_embeddings"])
    except (OSError, ValueError):
        pass
    if config.tree.max_context_tokens is not None:
        limits.append(config.tree.max_context_tokens)
    return min(limits) if limits else None


def make_demos_file(config: RunConfig, out: Path, n: int | None = None) -> dict[str, Any]:
    """Make demonstrations and write them to `out`; returns the counts."""
    from ops.demos import DemoStats, make_demonstrations, write_demos

    stats = DemoStats()
    demos = make_demonstrations(config, n, stats)
    write_demos(out, demos)
    return {
        "n_demos": len(demos),
        "n_imperfect": stats.imperfect,
        "skipped": dict(stats.skipped),
        "out": str(out),
    }


def warm_start(config: RunConfig, demos_path: Path | None = None, out_dir: Path | None = None) -> dict[str, Any]:
    """Demonstrations -> tokens -> fine-tuned model directory; returns the summary `sft run` prints."""
    from actors.chat import ChatCodec
    from learner.sft import run_sft
    from ops.demos import read_demos
    from ops.sft_data import DemoTokeniser, split_holdout, tokenise_all
    from tools_env.protocols import get_protocol

    started = time.perf_counter()
    sft = config.sft
    out = Path(out_dir or sft.out_dir)
    made: dict[str, Any] | None = None
    source = demos_path or (Path(sft.demos) if sft.demos else None)
    if source is None:
        source = default_demos_path(out)
        made = make_demos_file(config, source)
        log.info("demos_made", **made)
    demos = read_demos(source)
    if not demos:
        raise ConfigError(f"sft.demos: {source} holds no demonstrations")
    tokeniser = DemoTokeniser(ChatCodec.from_dir(config.model.dir), get_protocol(config.env.protocol).stop_strings)
    tokenised = tokenise_all(demos, tokeniser, _max_tokens(config))
    if not tokenised.demos:
        raise ConfigError(f"sft.demos: every demonstration in {source} is longer than the model's context")
    train, heldout = split_holdout(tokenised.demos, sft.holdout_fraction, sft.seed)
    result = run_sft(
        config.model.dir,
        [(d.input_ids, d.loss_mask) for d in train],
        [(d.input_ids, d.loss_mask) for d in heldout],
        sft,
        config.learner,
        out,
    )
    return {
        "n_demos": len(demos),
        "n_tokens": tokenised.tokens,
        "epochs": sft.epochs,
        "steps": result.steps,
        "heldout_loss_before": result.heldout_loss_before,
        "heldout_loss_after": result.heldout_loss_after,
        "train_loss_first": result.step_losses[0] if result.step_losses else None,
        "train_loss_last": result.step_losses[-1] if result.step_losses else None,
        "seconds": round(time.perf_counter() - started, 1),
        "out_dir": str(out),
        "n_train": len(train),
        "n_heldout": len(heldout),
        "n_imperfect": sum(not d.perfect for d in demos),
        "trained_tokens": result.trained_tokens,
        "dropped_too_long": tokenised.dropped_too_long,
        "train_seconds": round(result.seconds, 1),
        "demos": str(source),
    }


@sft_app.command("demos")
def demos_command(
    config: ConfigOption = None,
    overrides: SetOption = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="JSONL file (default: sft.demos, else beside sft.out_dir)")
    ] = None,
    n: Annotated[int | None, typer.Option("--n", min=1, help="demonstrations to make (default: sft.n_demos)")] = None,
) -> None:
    """Make demonstrations from the training split's oracle search paths and write them as JSONL."""
    run_config = load_or_exit(config, overrides)
    configure_logging(run_config.logging.level, run_config.logging.json_logs, role="sft")
    sft = run_config.sft
    target = out or (Path(sft.demos) if sft.demos else default_demos_path(sft.out_dir))
    try:
        summary = make_demos_file(run_config, target, n)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        typer.echo(f"cannot make demonstrations: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(summary))


@sft_app.command("run")
def run_command(
    config: ConfigOption = None,
    overrides: SetOption = None,
    demos: Annotated[Path | None, typer.Option("--demos", help="demonstrations JSONL (default: sft.demos)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="model directory to write (default: sft.out_dir)")] = None,
) -> None:
    """Fine-tune `model.dir` on demonstrations (made first if none are given) and write the warm-started model."""
    run_config = load_or_exit(config, overrides)
    configure_logging(run_config.logging.level, run_config.logging.json_logs, role="sft")
    try:
        summary = warm_start(run_config, demos, out)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        typer.echo(f"warm start cannot run: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(summary))
