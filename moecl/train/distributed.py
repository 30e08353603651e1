"""Data-parallel training with accelerate: when a step runs on several processes, and how they split a batch.

A step runs on several processes only under a distributed launch (`accelerate launch`, torchrun: WORLD_SIZE > 1),
which `moecl.train.launch.launch_step` starts when params train.processes > 1. Every process holds the whole
model; DDP averages the gradients. Each process takes a share of the rows of every global batch (global batch
= train.batch_size, in the same seeded order on every process) and scales its losses so that the averaged
gradient is the gradient of the whole global batch, as one process would compute it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from moecl.errors import MoeclError

# The main process evaluates the bank and writes it while the others wait at a barrier: long evaluations must
# not trip the collective timeout (NCCL/gloo default: 10-30 minutes).
PROCESS_GROUP_TIMEOUT = timedelta(hours=3)


def under_distributed_launch() -> bool:
    """True in a process started by a distributed launcher with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def check_mixed_precision(mixed_precision: str) -> None:
    import torch

    if mixed_precision != "no" and not torch.cuda.is_available():
        raise MoeclError(
            f"train.mixed_precision={mixed_precision!r} needs a GPU (none is visible here); "
            "set it to 'no' on CPUs"
        )


def check_processes(processes: int) -> None:
    """On a GPU machine each local process takes one GPU (DDP/NCCL cannot share one between processes)."""
    import torch

    if processes > 1 and torch.cuda.is_available() and processes > torch.cuda.device_count():
        raise MoeclError(
            f"train.processes={processes} but {torch.cuda.device_count()} GPU(s) are visible: one "
            "process per GPU (set train.processes to at most the GPU count)"
        )


def make_accelerator(mixed_precision: str = "no"):
    """The Accelerator of a step: DDP that tolerates unused parameters (earlier tasks' experts, discriminators
    of methods that do not use them), gloo on CPU-only machines, NCCL on GPUs."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    check_mixed_precision(mixed_precision)
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=True),
            InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT),
        ],
    )


@dataclass
class Share:
    """One process's share of a global batch and the weights that make DDP's gradient average exact.

    A loss that is a mean over this process's `n` rows (or targets) is multiplied by n * world / N (N: the
    global count); DDP divides the sum over processes by `world`, which leaves the mean over all N. A process
    whose share is empty (a last batch with fewer rows than processes) runs one row with weight 0, because every
    process must take part in the gradient all-reduce.
    """

    rows: list[int]
    row_weight: float  # for losses averaged over rows (the discriminators)
    empty: bool


def share_of(num_rows: int, rank: int, world: int) -> Share:
    rows = list(range(rank, num_rows, world))  # interleaved: task rows and memory rows spread over processes
    if not rows:
        return Share([0], 0.0, True)
    return Share(rows, len(rows) * world / num_rows, False)
