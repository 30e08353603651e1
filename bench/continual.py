"""One continual-learning run (method x mode x order) through the library's own step and evaluation.

Each task of the order is one `run_step` from the previous bank; each new bank is evaluated with
`evaluate_bank` on only the cells the metrics read: the task just learned (the diagonal R[i][i]) after each
step, every task after the last step (the final row). The step itself scores the new task just before
training (R[i-1][i]) and on the untrained model (b_i) for FWT. ACC/BWT/FWT come from moecl.metrics.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.params import method_params
from bench.variants import parse_variant
from moecl.data.task import TaskData
from moecl.evaluate import evaluate_bank
from moecl.model.base import BaseSpec
from moecl.train.step import run_step


@dataclass
class RunResult:
    method: str
    mode: str
    order: str
    tasks: list[str]
    metrics: dict  # ContinualMetrics.as_dict(): acc, bwt, fwt, per_task, matrix, before_training, zero_shot
    steps: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    # The final model's per-record correctness on each task's test sample (moecl.metrics.correctness):
    # runs scored on the same sample are compared record by record (bench.report.paired_comparisons).
    correct: dict[str, str] = field(default_factory=dict)
    # moecl methods: per task, the gate's weight on the task's own expert in the final model
    # (bench.routing.dedicated_share over the test prompts): {"mean", "min", "max"} over layers.
    routing: dict[str, dict] = field(default_factory=dict)
    seed: int = 42  # the training seed (the data sample is the preset's)

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "mode": self.mode,
            "order": self.order,
            "seed": self.seed,
            "tasks": self.tasks,
            "acc": self.metrics.get("acc"),
            "bwt": self.metrics.get("bwt"),
            "fwt": self.metrics.get("fwt"),
            "metrics": self.metrics,
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "correct": self.correct,
            "routing": self.routing,
        }


def run_continual(
    preset,
    method: str,
    mode: str,
    order_name: str,
    order: list[str],
    tasks: dict[str, TaskData],
    base: BaseSpec,
    workdir: Path,
    *,
    model_cfg=None,
    zero_shot_cache: dict | None = None,
    keep_banks: bool = False,
    progress: bool = False,
    seed: int | None = None,
) -> RunResult:
    """Train the order's tasks one after the other; return the metrics and per-step timings.

    `zero_shot_cache` (task -> b_i) is filled and reused across methods in instruction mode, where the
    untrained model's greedy answers do not depend on the method (in classifier mode b_i goes through the
    new task's freshly initialised head, which does, so it is scored per run).
    """
    params = method_params(preset, method, mode, model_cfg, seed)
    run_dir = workdir / f"{parse_variant(method).file_stem}-{mode}-{order_name}-s{params.train.seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    started = time.perf_counter()
    parent, evaluation, steps = None, None, []
    share_zero_shot = mode == "instruction" and zero_shot_cache is not None
    for i, task_id in enumerate(order):
        bank = run_dir / f"{i}-{task_id}"
        t0 = time.perf_counter()
        cached = zero_shot_cache.get(task_id) if share_zero_shot else None
        result = run_step(
            params,
            tasks[task_id],
            base=base,
            out_bank=bank,
            parent_bank=parent,
            progress=progress,
            replay_tasks={t: tasks[t] for t in order[:i]} if params.method.replay_per_task else None,
            zero_shot=cached,
        )
        if share_zero_shot and cached is None and result.zero_shot is not None:
            zero_shot_cache[task_id] = result.zero_shot
        t1 = time.perf_counter()
        last = i == len(order) - 1
        seen = {t: tasks[t] for t in order[: i + 1]}
        evaluation = evaluate_bank(
            bank, base, seen, params, progress=progress, only=None if last else [task_id]
        )
        t2 = time.perf_counter()
        losses = result.losses._asdict() if result.losses else None
        steps.append(
            {
                "task": task_id,
                "step_seconds": round(t1 - t0, 2),
                "eval_seconds": round(t2 - t1, 2),
                "optimisation_steps": len(result.outcome.losses),
                "train_examples": result.outcome.train_examples,
                "dev_examples": result.outcome.dev_examples,
                "replay_examples": result.outcome.replay_examples,
                "best_dev_accuracy": _num(result.best_dev_accuracy),
                "final_losses": {k: _num(v) for k, v in losses.items()} if losses else None,
            }
        )
        parent = bank
    metrics = evaluation.metrics.as_dict()
    seconds = time.perf_counter() - started  # training and evaluation; the routing probe is not timed
    routing = {}
    if params.method.uses_gate:
        try:
            routing = final_routing(parent, base, tasks, order, params)
        except Exception as exc:  # noqa: BLE001 - a diagnostic must not cost the run its results
            print(f"routing probe failed for {method} {mode} {order_name}: {exc!r}", file=sys.stderr)
    if not keep_banks:
        shutil.rmtree(run_dir, ignore_errors=True)
    return RunResult(
        method,
        mode,
        order_name,
        list(order),
        metrics,
        steps,
        seconds,
        evaluation.correct,
        routing,
        params.train.seed,
    )


def final_routing(bank: Path, base: BaseSpec, tasks: dict[str, TaskData], order: list[str], params) -> dict:
    """Per task of the final bank, the gate's weight beta_t on the task's own expert over its test prompts:
    the mean over layers and the lowest and highest layer (bench.routing)."""
    from bench.routing import dedicated_share, summarise_share
    from moecl.bank import load_bank
    from moecl.model.base import preferred_device

    loaded = load_bank(bank, base, device=preferred_device())
    return {
        task_id: summarise_share(
            dedicated_share(
                loaded.model,
                loaded.tokenizer,
                task_id,
                [r.text for r in tasks[task_id].test],
                params.train.max_length,
            )
        )
        for task_id in order
    }


def _num(value):
    if value is None:
        return None
    value = float(value)
    return None if value != value else round(value, 6)
