"""`launch_step`: one CL step, in this process or data-parallel on several (params train.processes).

The CLI (`moecl step`), the DVC stage `train` and the evolution path (`moecl.evolve.train_challenger`) all call
this. With train.processes = 1 and train.mixed_precision = "no" it is `run_step` in this process. Otherwise it
runs

    python -m accelerate.commands.launch --num_processes N --mixed_precision MP ... -m moecl.train.worker ...

as a subprocess and waits: every process loads the parent bank and the data, trains its share of each batch,
and the main one writes the bank (see moecl/train/worker.py, moecl/train/distributed.py, docs/scale-out.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from moecl.config import Params
from moecl.data.task import TaskData
from moecl.errors import BankError, MoeclError
from moecl.io import free_port
from moecl.model.base import BaseSpec
from moecl.train.loop import StepLosses, TrainOutcome
from moecl.train.step import StepResult, run_step


def _in_process(params: Params) -> bool:
    return params.train.processes == 1 and params.train.mixed_precision == "no"


def _load_folder(folder: str | Path, params: Params) -> TaskData:
    from moecl.data.validate import load_task

    return load_task(Path(folder), params.data)


def _task_folder(task: TaskData | None, task_id: str, params: Params) -> Path:
    if task is None:
        return Path(params.data.root) / task_id
    if task.path is None:
        raise MoeclError(
            f"task {task.task_id!r} has no folder: a multi-process step (train.processes > 1) reads "
            "its data from task folders"
        )
    return Path(task.path)


def launch_command(params: Params, worker_args: list[str], port: int | None = None) -> list[str]:
    """The `accelerate launch` command line of a step on this machine (one node)."""
    n = params.train.processes
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(n),
        "--num_machines",
        "1",
        "--mixed_precision",
        params.train.mixed_precision,
        "--dynamo_backend",
        "no",
    ]
    if n > 1:
        # N local processes through torch.distributed.run: one per GPU, or gloo processes on a CPU-only machine
        cmd += ["--multi_gpu", "--main_process_port", str(port or free_port())]
    return cmd + ["-m", "moecl.train.worker", *worker_args]


def _result_from_json(data: dict, seconds: float) -> StepResult:
    o = data["outcome"]
    losses, curve = [StepLosses(*x) for x in o["losses"]], [tuple(x) for x in o["dev_accuracy"]]
    outcome = TrainOutcome(**{**o, "losses": losses, "dev_accuracy": curve})
    return StepResult(**{**data, "bank_dir": Path(data["bank_dir"]), "seconds": seconds, "outcome": outcome})


def result_to_json(result: StepResult) -> dict:
    """The worker's StepResult as JSON (its losses as lists): what `_result_from_json` reads back."""
    return dataclasses.asdict(result) | {"bank_dir": str(result.bank_dir)}


def launch_step(
    params: Params,
    task_id: str,
    parent_bank: str | Path | None,
    out_bank: str | Path,
    *,
    task: TaskData | None = None,
    base: BaseSpec | None = None,
    eval_tasks: dict[str, TaskData] | None = None,
    replay_tasks: dict[str, TaskData] | None = None,
    lineage: dict | None = None,
    progress: bool = True,
    zero_shot: float | None = None,
) -> StepResult:
    """Train `task_id` from `parent_bank` into `out_bank` on params train.processes processes.

    `task`, `base`: already loaded by the caller (else read from params data.root / resolved from params model).
    `eval_tasks`, `replay_tasks`: as in `run_step` (None: no evaluation after training; no replay). With
    several processes every task
    must come from a folder, and the base model from params model (each process loads its own copy).
    """
    from moecl.model.base import base_from_params

    if _in_process(params):
        task = task if task is not None else _load_folder(Path(params.data.root) / task_id, params)
        return run_step(
            params,
            task,
            base=base or base_from_params(params.model),
            out_bank=out_bank,
            parent_bank=parent_bank,
            lineage=lineage,
            progress=progress,
            eval_tasks=eval_tasks,
            replay_tasks=replay_tasks,
            zero_shot=zero_shot,
        )

    from moecl.train.distributed import check_mixed_precision, check_processes

    check_mixed_precision(params.train.mixed_precision)
    check_processes(params.train.processes)
    if Path(out_bank).exists():
        raise BankError(f"{out_bank}: already exists; banks are immutable, choose a new directory")
    task_dir = _task_folder(task, task_id, params)
    resolved = base_from_params(params.model)  # pulls the backbone once, before N processes look for it
    if base is not None and base.sha256 != resolved.sha256:
        raise MoeclError(
            f"a multi-process step loads its base model from params model ({params.model.name_or_path},"
            f" sha256 {resolved.sha256[:12]}), not the one given ({base.name}, {base.sha256[:12]})"
        )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moecl-launch-") as tmp:
        import yaml

        params_file, result_file = Path(tmp) / "params.yaml", Path(tmp) / "result.json"
        params_file.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False), encoding="utf-8")
        args = [
            "--params",
            str(params_file),
            "--task-dir",
            str(task_dir),
            "--out",
            str(out_bank),
            "--result",
            str(result_file),
            "--base-sha256",
            resolved.sha256,
        ]
        if parent_bank:
            args += ["--bank", str(parent_bank)]
        if eval_tasks is None:
            args += ["--eval", "none"]
        else:
            args += ["--eval", "listed"]
            for t in eval_tasks.values():
                args += ["--eval-task-dir", str(_task_folder(t, t.task_id, params))]
        for t in (replay_tasks or {}).values():
            args += ["--replay-task-dir", str(_task_folder(t, t.task_id, params))]
        if lineage:
            args += ["--lineage", json.dumps(lineage)]
        if zero_shot is not None:
            args += ["--zero-shot", repr(zero_shot)]
        if not progress:
            args.append("--quiet")
        _run(launch_command(params, args))
        data = json.loads(result_file.read_text(encoding="utf-8"))
    return _result_from_json(data, time.perf_counter() - started)


def _run(cmd: list[str]) -> None:
    """Run the launch; its output goes to our stderr (stdout stays for the caller's own output)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # moecl importable in every process, from any directory
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        for line in proc.stdout:
            tail.append(line)
            sys.stderr.write(line)
        code = proc.wait()
    if code != 0:
        raise MoeclError(f"the multi-process step failed (exit {code}): {' '.join(cmd)}\n" + "".join(tail))
