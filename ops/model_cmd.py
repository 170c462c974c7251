"""`at2po model ...`: create the tiny CPU policy, and describe a local model directory.

Decided interface: `init-tiny --out DIR [--arch qwen2|llama] [--hidden 128] [--layers 2] [--heads 4]
[--kv-heads 2] [--intermediate 256] [--vocab 4096] [--seed 0] [--copy-steps 1100] [--force]` trains the tokenizer
on the synthetic world's texts, writes the model directory, then copy-pretrains it (`learner.copy_pretraining`;
`--copy-steps 0` leaves it random-init) and prints a JSON summary (parameters, vocabulary size, head_dim, files,
seconds, and the copy pretraining's steps, seconds, losses and copy accuracy, also recorded under
"copy_pretraining" in tiny_model.json). `info --dir DIR` prints JSON: architecture, parameters, vocabulary, layer
shape, special tokens, eos ids, whether every protocol tag is one token, and the weights' fingerprint. Bad
arguments (an invalid spec, a non-empty --out without --force) exit 2; a directory that is not a model exits 1.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

# `learner.copy_pretraining.CopyCurriculum.steps`, repeated so that `at2po --help` does not import torch.
DEFAULT_COPY_STEPS = 1100

model_app = typer.Typer(
    help="Policy models: create the tiny CPU policy, inspect a model directory.", no_args_is_help=True
)


@model_app.callback()
def _group() -> None:
    """Policy models (local directories only; nothing is downloaded)."""


def _quiet_transformers() -> None:
    """Keep progress bars off stdout-adjacent output: the commands print JSON."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@model_app.command("init-tiny")
def init_tiny(
    out: Annotated[Path, typer.Option("--out", help="directory to write the model into", file_okay=False)],
    arch: Annotated[str, typer.Option("--arch", help="qwen2 or llama")] = "qwen2",
    hidden: Annotated[int, typer.Option("--hidden", help="hidden size", min=1)] = 128,
    layers: Annotated[int, typer.Option("--layers", help="decoder layers", min=1)] = 2,
    heads: Annotated[int, typer.Option("--heads", help="attention heads (hidden/heads must suit vLLM)", min=1)] = 4,
    kv_heads: Annotated[int, typer.Option("--kv-heads", help="key/value heads", min=1)] = 2,
    intermediate: Annotated[int, typer.Option("--intermediate", help="MLP size", min=1)] = 256,
    vocab: Annotated[int, typer.Option("--vocab", help="target vocabulary size", min=1)] = 4096,
    seed: Annotated[int, typer.Option("--seed", help="seed of the weights and of the training texts", min=0)] = 0,
    copy_steps: Annotated[
        int, typer.Option("--copy-steps", help="copy pretraining steps (0 = leave the weights random)", min=0)
    ] = DEFAULT_COPY_STEPS,
    force: Annotated[bool, typer.Option("--force", help="write into a non-empty directory")] = False,
) -> None:
    """Train a tokenizer on the synthetic world, write a tiny policy and copy-pretrain it."""
    from actors.tiny_model import TinyModelSpec, init_tiny_model, world_training_texts

    try:
        spec = TinyModelSpec(
            architecture=arch,  # type: ignore[arg-type]  # validated by the spec
            hidden_size=hidden,
            layers=layers,
            heads=heads,
            kv_heads=kv_heads,
            intermediate=intermediate,
            vocab_size=vocab,
            seed=seed,
        )
    except ValueError as error:
        typer.echo(f"bad model shape: {error}", err=True)
        raise typer.Exit(2) from None
    _quiet_transformers()
    started = time.perf_counter()
    try:
        directory = init_tiny_model(out, spec, world_training_texts(seed=seed), overwrite=force)
    except (FileExistsError, NotADirectoryError) as error:
        typer.echo(f"cannot write the model: {error}; pass --force to overwrite", err=True)
        raise typer.Exit(2) from None
    manifest_path = directory / "tiny_model.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if copy_steps:
        from common.log import configure_logging
        from learner.copy_pretraining import CopyCurriculum, pretrain_model_dir

        configure_logging(role="init-tiny")  # progress on stderr: stdout holds only the JSON summary

        report = pretrain_model_dir(directory, CopyCurriculum(steps=copy_steps, seed=seed))
        manifest["copy_pretraining"] = asdict(report)
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    seconds = time.perf_counter() - started
    summary = {
        "out": str(directory),
        "architecture": spec.architecture,
        "parameters": _parameter_count(directory),
        "vocab_size": manifest["vocab_size"],
        "head_dim": spec.head_dim,
        "files": sorted(path.name for path in directory.iterdir()),
        "init_s": round(seconds, 3),
        "copy_pretraining": manifest.get("copy_pretraining"),
    }
    typer.echo(json.dumps(summary, indent=2))


def _parameter_count(directory: Path) -> int:
    """Distinct parameters in the saved weights (tied embeddings are stored once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())  # noqa: SIM118
    return total


@model_app.command("info")
def info(
    directory: Annotated[Path, typer.Option("--dir", help="a local model directory", file_okay=False)],
) -> None:
    """Describe a model directory: shape, vocabulary, special tokens, tags and weights fingerprint."""
    from actors.chat import ChatCodec
    from actors.policy_model import ModelDirError, load_policy, policy_fingerprint
    from actors.tiny_model import PROTOCOL_TAGS

    _quiet_transformers()
    try:
        policy = load_policy(directory)
    except ModelDirError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(1) from None
    config = policy.model.config
    codec = ChatCodec.from_policy(policy)
    tokenizer = policy.tokenizer
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    details: dict[str, Any] = {
        "dir": str(policy.model_dir),
        "architecture": policy.architecture,
        "model_type": config.model_type,
        "parameters": policy.num_parameters,
        "vocab_size": len(tokenizer),
        "model_vocab_size": int(config.vocab_size),
        "hidden_size": int(config.hidden_size),
        "layers": int(config.num_hidden_layers),
        "heads": heads,
        "kv_heads": int(getattr(config, "num_key_value_heads", heads)),
        "head_dim": int(head_dim),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "special_tokens": list(tokenizer.all_special_tokens),
        "eos_token_ids": sorted(codec.eos_token_ids),
        "pad_token_id": codec.pad_token_id,
        "tags_single_token": all(len(codec.observation_ids(tag)) == 1 for tag in PROTOCOL_TAGS),
        "fingerprint": policy_fingerprint(policy),
    }
    typer.echo(json.dumps(details, indent=2))
