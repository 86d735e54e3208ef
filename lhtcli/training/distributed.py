"""Multi-process training under torchrun: process group, data sharding, reductions, the launcher.

``lht train`` runs unchanged under ``torchrun --nproc_per_node N -m lhtcli train ...``; rank 0 alone
logs, prints and writes checkpoints. Data is sharded by batch index so that a run on R ranks with
accumulation A sees exactly the batches a 1-rank run with accumulation R*A sees, in the same order.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        if requested.type == "cuda" and self.enabled:
            return torch.device("cuda", self.local_rank)
        return requested

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """All-reduce sums of a few scalars (one collective for all of them)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group torchrun describes in the environment (a no-op in a plain run)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    context = DistributedContext(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(context.local_rank)
        # A bounded timeout: a rank that dies mid-collective must end the job, not hang it.
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=10))
    return context


class ShardedStream:
    """Each rank keeps every ``world_size``-th batch of the shared, deterministic batch stream."""

    def __init__(self, stream: Any, context: DistributedContext) -> None:
        self.stream = stream
        self.context = context

    def __iter__(self) -> ShardedStream:
        return self

    def __next__(self) -> Any:
        mine = None
        for index in range(self.context.world_size):
            batch = next(self.stream)
            if index == self.context.rank:
                mine = batch
        return mine

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


def shard(items: Sequence[Any], context: DistributedContext) -> list[Any]:
    return list(items[context.rank :: context.world_size])


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m lhtcli <argv>`` using this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "lhtcli", *argv]


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``lht <argv>`` on ``nproc`` local processes; returns torchrun's exit code."""
    if shutil.which(sys.executable) is None:  # pragma: no cover - a broken interpreter path
        raise RuntimeError("cannot find the Python interpreter to launch torchrun")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(torchrun_command(nproc, argv), env=env)
