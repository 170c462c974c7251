"""The DeepSpeed training engine around the same transformers model the actors run.

Decided here:
- One process per data-parallel rank. `init_process_group` sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/
  MASTER_PORT and lets DeepSpeed start torch.distributed (gloo on CPU, NCCL on GPU). On CPU DeepSpeed
  would JIT-compile its shared-memory all-reduce op (about 100 s of gcc) at the first `initialize`;
  `skip_shm_op_build` replaces that builder by a no-op, so gloo is used directly (dependencies.md §2).
- The optimizer is a client `torch.optim.AdamW` (no JIT build); DeepSpeed owns ZeRO, bf16 with fp32
  master weights, gradient clipping and the all-reduce.
- Gradient accumulation is driven by the caller, not by DeepSpeed's fixed `gradient_accumulation_steps`:
  a sampled batch is cut into a varying number of packed micro-batches, so `backward(loss, boundary)`
  marks the last one of an optimizer step and `step()` applies it. The DeepSpeed config therefore has
  gradient_accumulation_steps = 1 and the losses already carry the global 1/G weights; DeepSpeed
  averages gradients over ranks, so each rank's loss is multiplied by the world size (`loss_scale`).
- The model is loaded from a local directory only, with attention "sdpa" (tree packing needs a kernel
  that takes an arbitrary 4-D mask: see `learner.logprobs`).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.config import LearnerConfig


@dataclass(frozen=True)
class DistributedSpec:
    """Where this process sits in the data-parallel group."""

    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    def export(self) -> None:
        os.environ["RANK"] = str(self.rank)
        os.environ["LOCAL_RANK"] = str(self.rank)
        os.environ["WORLD_SIZE"] = str(self.world_size)
        os.environ["LOCAL_WORLD_SIZE"] = str(self.world_size)
        os.environ["MASTER_ADDR"] = self.master_addr
        os.environ["MASTER_PORT"] = str(self.master_port)


def skip_shm_op_build() -> None:
    """Make DeepSpeed's CPU accelerator skip compiling its shm all-reduce op (gloo does the work)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    module = importlib.import_module("deepspeed.comm.torch")
    module.build_shm_op = lambda: None  # type: ignore[attr-defined]


def deepspeed_config(cfg: LearnerConfig) -> dict[str, Any]:
    """The DeepSpeed JSON config a `LearnerConfig` stands for (GPU runs use the same keys)."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.grad_clip > 0:
        config["gradient_clipping"] = cfg.grad_clip
    if cfg.bf16:
        config["bf16"] = {"enabled": True}
    return config


def load_train_model(model_dir: str | Path, bf16: bool = False) -> nn.Module:
    """The policy for training: local files only, sdpa attention, fp32 master copy unless bf16."""
    from transformers import AutoModelForCausalLM

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path} (config.json missing); make one with `at2po model init-tiny`")
    model = AutoModelForCausalLM.from_pretrained(
        str(path), local_files_only=True, attn_implementation="sdpa", dtype=torch.float32
    )
    model.config.use_cache = False
    return model


class TrainEngine:
    """A DeepSpeed engine with caller-driven accumulation; `module` is the trained transformers model."""

    def __init__(self, model: nn.Module, cfg: LearnerConfig, dist: DistributedSpec) -> None:
        skip_shm_op_build()
        import deepspeed

        dist.export()
        self.dist = dist
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.weight_decay,
        )
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg), dist_init_required=True
        )
        self.engine = engine
        self.bf16 = cfg.bf16

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def loss_scale(self) -> float:
        """Multiply each rank's loss by this so that DeepSpeed's rank average becomes the global sum."""
        return float(self.dist.world_size)

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss)

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next optimizer steps (a schedule is the caller's: the warm start's)."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> float:
        """Apply the accumulated gradients; returns the global gradient norm before clipping."""
        self.engine.set_gradient_accumulation_boundary(True)
        local = self._local_grad_norm()
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:  # ZeRO 0 with a client optimizer does not record it; grads were all-reduced already
            norm = local
        return float(norm)

    def _local_grad_norm(self) -> float:
        grads = [p.grad.detach().float() for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return float("nan")
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def save(self, directory: Path, tag: str) -> None:
        """Collective: every rank must call it (ZeRO shards the optimizer state)."""
        self.engine.save_checkpoint(str(directory), tag=tag, save_latest=False)

    def load(self, directory: Path, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} in {directory}")
