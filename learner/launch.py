"""Start the learner's ranks: in this process for one, as spawned processes for data parallelism.

Decided here: `learner.processes = N > 1` spawns N processes on this machine (torch.multiprocessing,
"spawn" start method), each rebuilding the RunConfig from its JSON dump (no pickled objects beyond the
config text), with RANK/WORLD_SIZE/MASTER_* set before DeepSpeed starts torch.distributed. SIGTERM or
SIGINT to the parent is forwarded to every rank; rank 0 finishes the current step, checkpoints, and
tells the others to stop. The parent exits non-zero if any rank did.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path
from types import FrameType

from common.config import RunConfig
from learner.engine import DistributedSpec
from learner.loop import Learner, LearnerSummary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def install_stop_handlers(stop: threading.Event) -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run_rank(
    config: RunConfig, dist: DistributedSpec, resume: bool, stop: threading.Event | None = None
) -> LearnerSummary:
    stop = stop or threading.Event()
    learner = Learner(config, dist, resume=resume, stop=stop)
    return learner.run()


def _spawned_rank(rank: int, config_json: str, world_size: int, port: int, resume: bool, summary_path: str) -> None:
    from common.log import configure_logging

    config = RunConfig.model_validate_json(config_json)
    configure_logging(config.logging.level, config.logging.json_logs, role=f"learner-{rank}")
    stop = threading.Event()
    install_stop_handlers(stop)
    summary = run_rank(config, DistributedSpec(rank=rank, world_size=world_size, master_port=port), resume, stop)
    if rank == 0:
        Path(summary_path).write_text(json.dumps(asdict(summary)), encoding="utf-8")


def run_learner(config: RunConfig, resume: bool = False, stop: threading.Event | None = None) -> LearnerSummary:
    """Run every rank to the end; returns rank 0's summary."""
    world = config.learner.processes
    port = config.learner.master_port or free_port()
    if world == 1:
        return run_rank(config, DistributedSpec(master_port=port), resume, stop)
    import torch.multiprocessing as mp

    handle, summary_name = tempfile.mkstemp(prefix="at2po-learner-", suffix=".json")
    os.close(handle)
    context = mp.start_processes(
        _spawned_rank,
        args=(config.model_dump_json(), world, port, resume, summary_name),
        nprocs=world,
        join=False,
        start_method="spawn",
    )

    def forward(signum: int, _frame: FrameType | None) -> None:
        for process in context.processes:
            if process.is_alive() and process.pid is not None:
                process.kill() if signum == signal.SIGKILL else process.terminate()

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not context.join():
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    try:
        return LearnerSummary(**json.loads(Path(summary_name).read_text(encoding="utf-8")))
    finally:
        os.unlink(summary_name)
