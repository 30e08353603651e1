"""One continual-learning step: from a parent bank (or none) and one task's data to a new bank.

New task: a fresh dedicated expert (and head) is added; the step trains it with the shared expert, the gates
and the discriminators. A new data version of a KNOWN task continues that task's own expert. Every other
task's expert and head receive no gradient and their files are carried over byte-identical.

Under a distributed launch (moecl/train/launch.py) every process runs this function: all of them train, only
the main process evaluates and writes the bank, and the others wait for it.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moecl.bank import load_bank, new_model, read_evaluation, read_manifest, save_bank
from moecl.config import Params
from moecl.data.task import TaskData
from moecl.errors import BankError, MoeclError
from moecl.manifest import CONTENT_HASH_KEY
from moecl.model.base import BaseSpec, preferred_device
from moecl.model.encoding import Encoder
from moecl.model.moecl_model import TaskInfo
from moecl.sampling import stratified_sample
from moecl.train.allocator import keep_freed_memory
from moecl.train.distributed import make_accelerator, under_distributed_launch
from moecl.train.loop import StepLosses, TrainOutcome, train_on_task


@dataclass
class StepResult:
    bank_dir: Path
    task_id: str
    new_task: bool
    before_training: float | None = None  # R[i-1][i]: the new task just before training
    zero_shot: float | None = None  # b_i: the untrained base model on the new task
    seconds: float = 0.0
    outcome: TrainOutcome = field(default_factory=TrainOutcome)

    @property
    def losses(self) -> StepLosses | None:
        """The last optimisation step's losses."""
        return self.outcome.final_losses

    @property
    def best_dev_accuracy(self) -> float:
        """The dev accuracy of the checkpoint kept (NaN without a dev split)."""
        return self.outcome.best_dev_accuracy


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:
        pass


# Method settings that shape a bank's modules: a step must use its parent's.
STRUCTURAL_KEYS = ("name", "mode", "task_gates", "shared_orthogonal")


def structure_mismatches(built, wanted) -> list[tuple[str, object, object]]:
    """(key, the bank's value, the params' value) for each structural method setting that differs."""
    out = [
        (k, getattr(built, k), getattr(wanted, k))
        for k in STRUCTURAL_KEYS
        if getattr(built, k) != getattr(wanted, k)
    ]
    if bool(built.gate_bias) != bool(wanted.gate_bias) and built.uses_gate and not built.task_gates:
        out.append(("gate_bias", built.gate_bias, wanted.gate_bias))  # a gate with a bias, or one without
    return out


def parent_history(parent_bank: Path | None) -> dict:
    """The accuracy history up to the parent: its evaluation if it was evaluated, else its own history."""
    if parent_bank is None:
        return {"matrix": [], "before_training": {}, "zero_shot": {}}
    evaluation = read_evaluation(parent_bank)
    history = dict(read_manifest(parent_bank).history)
    if evaluation:
        history["matrix"] = evaluation["rows"]
    history.setdefault("matrix", [])
    history.setdefault("before_training", {})
    history.setdefault("zero_shot", {})
    return history


def _test_records(task: TaskData, params: Params):
    return stratified_sample(task.test, params.evaluate.max_test_examples, params.train.seed)


def run_step(
    params: Params,
    task: TaskData,
    *,
    base: BaseSpec,
    out_bank: str | Path,
    parent_bank: str | Path | None = None,
    lineage: dict | None = None,
    progress: bool = True,
    eval_tasks: dict[str, TaskData] | None = None,
    replay_tasks: dict[str, TaskData] | None = None,
    zero_shot: float | None = None,
    accelerator=None,
) -> StepResult:
    """Train `task` from `parent_bank` into the new bank `out_bank`.

    With `eval_tasks` (test data of the bank's other tasks) the step also evaluates every task after training
    and stores that row of the accuracy matrix in the bank, so each bank carries its full history.
    `replay_tasks`: the earlier tasks' data to replay (method.replay_per_task training records of each; their
    test splits are never read).
    `zero_shot`: b_i already measured by the caller on the same test records (in instruction mode the
    untrained model is the same for every method, so a benchmark scores it once); None scores it here.
    `accelerator`: train with this accelerate.Accelerator (made here under a distributed launch); only its main
    process evaluates and writes `out_bank`, then every process waits for it.
    """
    from moecl.evaluate import evaluate_model, task_accuracy

    started = time.perf_counter()
    if params.train.threads:
        torch.set_num_threads(params.train.threads)
    if params.train.keep_freed_memory:
        keep_freed_memory()
    parent_bank = Path(parent_bank) if parent_bank else None
    out_bank = Path(out_bank)
    if out_bank.exists():
        raise BankError(f"{out_bank}: already exists; banks are immutable, choose a new directory")
    if accelerator is None and under_distributed_launch():
        accelerator = make_accelerator(params.train.mixed_precision)
    main = accelerator is None or accelerator.is_main_process
    seed_everything(params.train.seed)
    if parent_bank is not None:
        loaded = load_bank(parent_bank, base)
        model, tokenizer, memory = loaded.model, loaded.tokenizer, dict(loaded.memory)
        for key, built, wanted in structure_mismatches(model.method, params.method):
            raise MoeclError(
                f"params method.{key}={wanted!r} but the bank {parent_bank} was built with {built!r}; "
                "start a new bank to change it"
            )
        model.method = dataclasses.replace(params.method)  # the training knobs of this step
        steps = list(loaded.manifest.steps)
    else:
        model, tokenizer = new_model(base, params.lora, params.method)
        memory, steps = {}, []
    seed_everything(params.train.seed + len(steps))

    new_task = task.task_id not in model.task_ids
    if new_task:
        model.add_task(TaskInfo(task.task_id, list(task.labels), task.instruction, task.positive_label))
    elif model.task(task.task_id).labels != list(task.labels):
        raise MoeclError(
            f"task {task.task_id!r}: labels changed from {model.task(task.task_id).labels} to "
            f"{task.labels}; a task's labels are fixed once learned (use a new task id)"
        )
    # after add_task: a new expert is initialised on the CPU whatever the device, so runs match across devices
    model.to(accelerator.device if accelerator is not None else preferred_device())

    history = parent_history(parent_bank)
    result_before = result_zero = None
    if main and new_task and params.evaluate.fwt:
        test = _test_records(task, params)
        result_before = task_accuracy(model, tokenizer, task.task_id, test, params)
        result_zero = (
            zero_shot
            if zero_shot is not None
            else task_accuracy(model, tokenizer, task.task_id, test, params, disabled=True)
        )
        history["before_training"] = {**history["before_training"], task.task_id: result_before}
        history["zero_shot"] = {**history["zero_shot"], task.task_id: result_zero}

    outcome = train_on_task(
        model,
        tokenizer,
        task,
        params,
        memory=memory,
        replay=replay_tasks,
        progress=progress and main,
        accelerator=accelerator,
    )

    def result() -> StepResult:  # (R[i-1][i] and b_i are None outside the main process)
        seconds = time.perf_counter() - started
        return StepResult(out_bank, task.task_id, new_task, result_before, result_zero, seconds, outcome)

    if not main:  # the main process evaluates and writes the bank
        accelerator.wait_for_everyone()
        return result()

    if eval_tasks is not None:
        row, stripping, *_ = evaluate_model(
            model, tokenizer, {**eval_tasks, task.task_id: task}, params, progress=progress
        )
        history["matrix"] = list(history["matrix"]) + [row]
        history["stripping_rate"] = stripping

    if params.method.memory_per_task > 0 and model.has_discriminator:
        encoder = Encoder(
            tokenizer, task.task_id, task.labels, task.instruction, model.mode, params.train.max_length
        )
        kept = stratified_sample(task.train, params.method.memory_per_task, params.train.seed)
        memory[task.task_id] = [encoder.encode(r.text, with_answer=False).input_ids for r in kept]

    save_bank(
        model,
        out_bank,
        base=base,
        trained_task=task.task_id,
        parent_dir=parent_bank,
        steps=steps + [task.task_id],
        history=history,
        lineage={CONTENT_HASH_KEY: task.content_hash(), "params": params.to_dict(), **(lineage or {})},
        memory={task.task_id: memory[task.task_id]} if task.task_id in memory else None,
        train_summary=outcome.summary(),
    )
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return result()
