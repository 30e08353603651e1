"""The multi-task upper bound ("mtl"): one LoRA trained on every task at once, not continual.

A MoECLModel with method seq_lora (the shared LoRA alone) learns shuffled batches that mix the tasks, with the
library's own `train_step`: in instruction mode each record carries its own task's prompt; in classifier mode
each row goes through its own task's head. Sampling, the dev split, the encoder, batching, dev selection and evaluation are moecl's own.
"""

from __future__ import annotations

import math
import time

import torch

from bench.continual import RunResult
from bench.params import method_params
from moecl.bank import new_model
from moecl.data.task import TaskData
from moecl.evaluate import evaluate_model
from moecl.metrics import ContinualMetrics
from moecl.model.base import BaseSpec
from moecl.model.encoding import Encoder, collate, pad_id
from moecl.model.moecl_model import MoECLModel, TaskInfo
from moecl.sampling import split_dev, stratified_sample
from moecl.train.loop import dev_accuracy, train_step
from moecl.train.step import seed_everything


def _trainable(model: MoECLModel) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.shared_parameters().values())
    for task_id in model.task_ids:
        params += list(model.task_parameters(task_id).values())
    for p in params:
        p.requires_grad_(True)
    return params


def train_joint(params, tasks: list[TaskData], base: BaseSpec, *, progress: bool = False):
    """Train one shared LoRA on all tasks; keep the checkpoint with the best mean dev accuracy."""
    cfg = params.train
    seed_everything(cfg.seed)
    model, tokenizer = new_model(base, params.lora, params.method)
    items, dev = [], {}
    for task in tasks:
        model.add_task(TaskInfo(task.task_id, list(task.labels), task.instruction, task.positive_label))
        records = stratified_sample(task.train, cfg.max_train_examples, cfg.seed)
        train_records, dev[task.task_id] = split_dev(records, cfg.dev_fraction, cfg.seed)
        encoder = Encoder(tokenizer, task.task_id, task.labels, task.instruction, model.mode, cfg.max_length)
        items += [encoder.encode(r.text, r.label) for r in train_records]
    device = model.layers[0].base.down_proj.weight.device
    trainable = _trainable(model)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = max(1, math.ceil(len(items) / cfg.batch_size))
    eval_every = max(1, steps_per_epoch // max(1, cfg.evals_per_epoch))
    total_steps = steps_per_epoch * cfg.epochs
    pad = pad_id(tokenizer)
    best, best_state, losses, step = -1.0, None, [], 0

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, desc="train mtl", disable=not progress, leave=False)
    for _epoch in range(cfg.epochs):
        order = torch.randperm(len(items), generator=generator).tolist()
        for start in range(0, len(order), cfg.batch_size):
            batch = collate([items[i] for i in order[start : start + cfg.batch_size]], pad).to(device)
            losses.append(
                train_step(model, model, batch, [], optimizer).task
            )  # each row: its own task's loss
            step += 1
            bar.update(1)
            if any(dev.values()) and (step % eval_every == 0 or step == total_steps):
                scores = [dev_accuracy(model, tokenizer, t, recs, params) for t, recs in dev.items() if recs]
                mean = sum(scores) / len(scores)
                if mean > best:
                    best, best_state = mean, [p.detach().clone() for p in trainable]
    bar.close()
    if best_state is not None:
        with torch.no_grad():
            for p, saved in zip(trainable, best_state):
                p.copy_(saved)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    info = {
        "optimisation_steps": step,
        "train_examples": len(items),
        "best_dev_accuracy": round(best, 6),
        "final_loss": round(losses[-1], 6) if losses else None,
    }
    return model, tokenizer, info


def run_joint(
    preset,
    mode: str,
    tasks: dict[str, TaskData],
    base: BaseSpec,
    *,
    model_cfg=None,
    zero_shot: dict | None = None,
    progress: bool = False,
    seed: int | None = None,
) -> RunResult:
    """The upper bound on the preset's tasks (task order does not matter: one run per mode)."""
    params = method_params(preset, "mtl", mode, model_cfg, seed)
    started = time.perf_counter()
    ordered = [tasks[t] for t in sorted(tasks)]
    model, tokenizer, info = train_joint(params, ordered, base, progress=progress)
    t_train = time.perf_counter() - started
    evaluation = evaluate_model(model, tokenizer, tasks, params, progress=progress)
    names = [t.task_id for t in ordered]
    metrics = ContinualMetrics(
        order=names, matrix=[evaluation.row], zero_shot=dict(zero_shot or {})
    ).as_dict()
    metrics["bwt"] = metrics["fwt"] = None  # not a continual run: no forgetting or transfer to measure
    info.update(
        step_seconds=round(t_train, 2), eval_seconds=round(time.perf_counter() - started - t_train, 2)
    )
    del model
    seconds = time.perf_counter() - started
    return RunResult(
        "mtl", mode, "joint", names, metrics, [info], seconds, evaluation.correct, seed=params.train.seed
    )
