"""The entry point of each process of a multi-process step: `accelerate launch ... -m moecl.train.worker ...`.

Loads params, the task data and the base model like `moecl step`, then calls `run_step` with an accelerate
Accelerator. `moecl.train.launch.launch_step` starts it on one machine; for several machines start it yourself
on each (docs/scale-out.md). Only the main process writes the bank (and --result).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m moecl.train.worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--params", default="params.yaml")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--task", help="task id: the folder <data.root>/<task>")
    where.add_argument("--task-dir", help="the task folder itself")
    p.add_argument("--bank", help="the parent bank (none: the first step)")
    p.add_argument("--out", required=True, help="the new bank directory (must not exist)")
    p.add_argument(
        "--eval",
        choices=("auto", "listed", "none"),
        default="auto",
        help="evaluate after training: auto = every task the parent knows (from data.root, like "
        "`moecl step`); listed = the --eval-task-dir folders; none = no evaluation",
    )
    p.add_argument("--eval-task-dir", action="append", default=[])
    p.add_argument(
        "--replay-task-dir", action="append", default=[], help="an earlier task's folder to replay from"
    )
    p.add_argument("--lineage", default=None, help="extra lineage for the bank manifest (JSON object)")
    p.add_argument("--zero-shot", type=float, default=None)
    p.add_argument("--base-sha256", default=None, help="fail unless params model resolves to this base")
    p.add_argument("--result", default=None, help="the main process writes the step's result here (JSON)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from moecl.errors import MoeclError

    try:
        return _run(args)
    except MoeclError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import torch

    from moecl.bank import read_manifest
    from moecl.config import load_params
    from moecl.data.validate import load_task
    from moecl.errors import MoeclError
    from moecl.model.base import base_from_params
    from moecl.train.distributed import make_accelerator
    from moecl.train.launch import result_to_json
    from moecl.train.step import run_step

    params = load_params(args.params, args.overrides)
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")  # set by `accelerate launch --mixed_precision`
    if launched and launched != params.train.mixed_precision:
        raise MoeclError(
            f"accelerate launch --mixed_precision {launched}, but params train.mixed_precision="
            f"{params.train.mixed_precision!r}: set them alike (params decide, and the bank records them)"
        )
    accelerator = make_accelerator(params.train.mixed_precision)
    task = load_task(
        Path(args.task_dir) if args.task_dir else Path(params.data.root) / args.task, params.data
    )
    if args.eval == "none":
        eval_tasks = None
    elif args.eval == "listed":
        eval_tasks = {t.task_id: t for t in (load_task(Path(d), params.data) for d in args.eval_task_dir)}
    else:
        known = read_manifest(args.bank).task_ids if args.bank else []
        root = Path(params.data.root)
        eval_tasks = {t: load_task(root / t, params.data) for t in known if t != task.task_id}
    replay_tasks = {t.task_id: t for t in (load_task(Path(d), params.data) for d in args.replay_task_dir)}
    base = base_from_params(params.model)
    if args.base_sha256 and base.sha256 != args.base_sha256:
        raise MoeclError(
            f"params model resolves to a base with sha256 {base.sha256[:12]} on this machine, "
            f"expected {args.base_sha256[:12]}"
        )
    result = run_step(
        params,
        task,
        base=base,
        out_bank=args.out,
        parent_bank=args.bank,
        lineage=json.loads(args.lineage) if args.lineage else None,
        progress=not args.quiet,
        eval_tasks=eval_tasks,
        replay_tasks=replay_tasks or None,
        zero_shot=args.zero_shot,
        accelerator=accelerator,
    )
    if accelerator.is_main_process and args.result:
        Path(args.result).write_text(json.dumps(result_to_json(result)), encoding="utf-8")
    accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
