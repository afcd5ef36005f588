"""The process group as the trainer uses it: start it, print once, and the few reductions every rank takes part in."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator


def init() -> None:
    """Join the launcher's process group; a plain `python` run is rank 0 of 1 on a free local port."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed()
    _unlink_shared_buffer()


def _unlink_shared_buffer() -> None:
    """DeepSpeed's CPU all-reduce gives each rank a 69 MB file in /dev/shm and never removes it: every CPU run left
    ~140 MB of memory behind per rank pair until reboot (a test suite, ~4 GB). Once every rank has mapped every
    other's (each rank's init waits for that; the barrier waits for every rank's init), the names can go: the
    mappings live until the ranks exit, and nothing is left even when a rank is killed."""
    if get_accelerator().device_name() != "cpu":
        return
    dist.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_{rank()}"
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def rank() -> int:
    return dist.get_rank()


def world() -> int:
    return dist.get_world_size()


def print0(text: str) -> None:
    """Print on rank 0 only: every rank knows the same thing, one line says it."""
    if rank() == 0:
        print(text, flush=True)


def sum_over_ranks(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The sum of every rank's `values`, on the CPU (reduced on `device`: NCCL reduces device tensors only)."""
    values = values.to(device)
    dist.all_reduce(values)
    return values.cpu()


def any_rank(flag: bool, device: torch.device) -> bool:
    return sum_over_ranks(torch.tensor([float(flag)]), device).item() > 0


def any_rank_non_finite(loss: torch.Tensor) -> bool:
    """Whether any rank's loss is inf or NaN. Every rank must agree before backward (ZeRO's backward hooks are
    collectives), so this is the micro-step's one host sync: the flag is reduced where the loss lives."""
    flag = (~torch.isfinite(loss.detach())).float().reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
