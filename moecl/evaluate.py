"""Evaluation: each task's test accuracy for a bank, the accuracy matrix, ACC/BWT/FWT, stripping rates."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from moecl.bank import EVALUATION, check_base, load_bank, read_evaluation, verify_bank
from moecl.config import Params
from moecl.data.task import Record, TaskData
from moecl.errors import UnknownTaskError
from moecl.io import write_text_atomic
from moecl.metrics import ContinualMetrics, accuracy, correctness, stripping_rate
from moecl.model.base import BaseSpec, preferred_device
from moecl.model.inference import predict
from moecl.sampling import stratified_sample


def task_predictions(
    model,
    tokenizer,
    task_id: str,
    records: list[Record],
    params: Params,
    *,
    disabled: bool = False,
    with_scores: bool = False,
):
    return predict(
        model,
        tokenizer,
        task_id,
        [r.text for r in records],
        max_length=params.train.max_length,
        batch_size=params.evaluate.batch_size,
        instruction_eval=params.evaluate.instruction_eval,
        max_new_tokens=params.evaluate.max_new_tokens,
        disabled=disabled,
        with_scores=with_scores,
    )


def task_accuracy(
    model, tokenizer, task_id: str, records: list[Record], params: Params, *, disabled: bool = False
) -> float:
    preds = task_predictions(model, tokenizer, task_id, records, params, disabled=disabled)
    return accuracy([p.label for p in preds], [r.label for r in records])


class ModelEvaluation(NamedTuple):
    """One model's evaluation: task -> accuracy, stripping rate (binary tasks), test size, and which test
    records it got right (moecl.metrics.correctness, in the order of the stratified test sample)."""

    row: dict[str, float]
    stripping: dict[str, float]
    sizes: dict[str, int]
    correct: dict[str, str]


def evaluate_model(
    model,
    tokenizer,
    tasks: dict[str, TaskData],
    params: Params,
    *,
    progress: bool = True,
    only: list[str] | None = None,
) -> ModelEvaluation:
    """Accuracy (and the stripping rate of binary tasks with a positive label) of every task in the model.

    `only` restricts the evaluation to those of the model's tasks (e.g. a benchmark that needs just the cells
    its metrics read); None evaluates every task.
    """
    from tqdm.auto import tqdm

    task_ids = [t for t in model.task_ids if only is None or t in only]
    missing = [t for t in task_ids if t not in tasks]
    if missing:
        raise UnknownTaskError(f"no test data for task(s) {', '.join(missing)} known to the bank")
    row, stripping, sizes, correct = {}, {}, {}, {}
    for task_id in tqdm(task_ids, desc="evaluate", disable=not progress, leave=False):
        task = tasks[task_id]
        records = stratified_sample(task.test, params.evaluate.max_test_examples, params.train.seed)
        binary = task.positive_label is not None and len(task.labels) == 2
        preds = task_predictions(model, tokenizer, task_id, records, params, with_scores=binary)
        predicted, gold = [p.label for p in preds], [r.label for r in records]
        row[task_id] = accuracy(predicted, gold)
        sizes[task_id] = len(records)
        correct[task_id] = correctness(predicted, gold)
        if binary and preds and preds[0].scores:
            stripping[task_id] = stripping_rate(
                [p.scores.get(task.positive_label, 0.0) for p in preds],
                [r.label == task.positive_label for r in records],
                params.evaluate.stripping_precision,
            )
    return ModelEvaluation(row, stripping, sizes, correct)


@dataclass(frozen=True)
class BankEvaluation:
    """A bank's evaluation: its continual-learning metrics, and the record evaluation.json holds.

    The record: {"metrics": cl.json shape, "rows", "steps", "stripping_rate", "test_sizes", "correct"}
    ("correct": task -> per-record correctness string of the tasks evaluated, see `correctness`; empty when
    the step had already evaluated the bank). `metrics` is built from the record, so a stored evaluation and
    a fresh one give the same numbers."""

    metrics: ContinualMetrics
    record: dict

    @classmethod
    def from_record(cls, record: dict) -> BankEvaluation:
        m = record["metrics"]
        metrics = ContinualMetrics(
            order=m["order"],
            matrix=record["rows"],
            before_training=m["before_training"],
            zero_shot=m["zero_shot"],
            steps=record["steps"],
        )
        return cls(metrics, record)

    @property
    def stripping_rate(self) -> dict[str, float]:
        return self.record.get("stripping_rate", {})

    @property
    def correct(self) -> dict[str, str]:
        return self.record.get("correct", {})


def evaluate_bank(
    bank_dir: str | Path,
    base: BaseSpec,
    tasks: dict[str, TaskData],
    params: Params,
    *,
    write: bool = True,
    progress: bool = True,
    only: list[str] | None = None,
) -> BankEvaluation:
    """Evaluate a bank on every task it knows; append the row to its history; write evaluation.json once.

    An already evaluated bank returns its stored evaluation (a bank and its evaluation never change).
    `only` evaluates just those tasks: the row holds only their cells (the metrics accept partial rows).
    """
    bank_dir = Path(bank_dir)
    manifest = verify_bank(bank_dir)  # a corrupted bank is refused even where its evaluation is stored
    existing = read_evaluation(bank_dir)
    if existing is not None:
        return BankEvaluation.from_record(existing)
    check_base(bank_dir, manifest, base)
    history = manifest.history
    steps = list(manifest.steps)
    if len(history.get("matrix", [])) == len(steps):  # the step already evaluated this bank
        rows, stripping, sizes, correct = list(history["matrix"]), history.get("stripping_rate", {}), {}, {}
    else:
        loaded = load_bank(bank_dir, base, device=preferred_device())
        row, stripping, sizes, correct = evaluate_model(
            loaded.model, loaded.tokenizer, tasks, params, progress=progress, only=only
        )
        rows = list(history.get("matrix", [])) + [row]
    order = list(dict.fromkeys(steps))
    metrics = ContinualMetrics(
        order=order,
        matrix=rows,
        before_training=history.get("before_training", {}),
        zero_shot=history.get("zero_shot", {}),
        steps=steps,
    )
    record = {
        "metrics": metrics.as_dict(),
        "rows": rows,
        "steps": steps,
        "stripping_rate": stripping,
        "test_sizes": sizes,
        "correct": correct,
    }
    if write:
        write_text_atomic(
            bank_dir / EVALUATION, json.dumps(record, indent=2, sort_keys=True), what="the bank's evaluation"
        )
    return BankEvaluation.from_record(record)
