"""Kept banks (`bench.run --workdir W --keep-banks`) loaded for inspection: bench.agreement, bench.routing.

Both read banks back with the preset's backbone on the CPU and score them on the preset's own test sample of
the banks' tasks, so their figures are about the records the benchmark itself evaluated.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options every kept-bank tool takes: whose sampling, which tasks, where the data is, threads."""
    ap.add_argument("--preset", default="cpu", help="whose test sampling and sizes to use (default cpu)")
    ap.add_argument("--tasks", nargs="+", help="tasks to probe (default: every task of the reference bank)")
    ap.add_argument("--data", help="the mtl5 folder (default $MOECL_MTL5, then ../shared/data/mtl5)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")


@dataclass
class KeptBanks:
    loaded: list  # moecl.bank.LoadedBank, in the order given
    mode: str  # the banks' output mode (read from the reference bank)
    params: object  # moecl Params of the preset in that mode: sampling, max length, evaluation settings
    tasks: list[str]
    data: dict  # task -> TaskData with the preset's training and test samples


def load_kept_banks(args: argparse.Namespace, banks: list[str | Path], reference: int = 0) -> KeptBanks:
    """Load `banks` and the preset's data for the tasks of `banks[reference]` (or `args.tasks`)."""
    from bench.backbones import params_base
    from bench.params import method_params, model_config
    from bench.presets import get_preset
    from bench.tasks import find_mtl5, load_mtl5
    from moecl.bank import load_bank

    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    cfg = model_config(preset)
    base = params_base(cfg, "cpu")
    loaded = [load_bank(Path(b), base) for b in banks]
    mode = loaded[reference].model.mode
    size = preset.modes[mode]
    tasks = args.tasks or list(loaded[reference].model.task_ids)
    data = load_mtl5(find_mtl5(args.data), tasks, size.per_class, size.test_per_task, preset.seed)
    return KeptBanks(loaded, mode, method_params(preset, "moecl", mode, cfg), tasks, data)
