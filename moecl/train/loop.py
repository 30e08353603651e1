"""The training loop of one continual-learning step: one task, plain AdamW, best dev checkpoint kept.

Under a distributed launch (see moecl/train/distributed.py) the same loop runs on every process with
accelerate: DDP averages the gradients, each process takes its share of every global batch, and the dev
evaluation is split over the processes and summed, so every process takes the same best-checkpoint decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from moecl.config import Params
from moecl.data.task import Record, TaskData
from moecl.evaluate import task_predictions
from moecl.metrics import accuracy, json_number
from moecl.model.encoding import IGNORE_INDEX, Encoded, Encoder, collate, pad_id
from moecl.model.moecl_model import MoECLModel
from moecl.sampling import split_dev, stratified_sample
from moecl.train.distributed import make_accelerator, share_of, under_distributed_launch
from moecl.train.terms import build_terms


class StepLosses(NamedTuple):
    """Losses of one optimisation step. total = task + adversarial (+ any baseline penalty)."""

    total: float
    task: float
    adversarial: float  # -alpha * L_adv: what the adversarial term adds to the generator's objective
    discriminator: float  # L_adv: the discriminators' cross-entropy (what they minimise)


@dataclass
class TrainOutcome:
    losses: list[StepLosses] = field(default_factory=list)
    dev_accuracy: list[tuple[int, float]] = field(default_factory=list)  # (optimisation step, accuracy)
    best_dev_accuracy: float = float("nan")
    best_step: int = 0
    train_examples: int = 0
    dev_examples: int = 0
    replay_examples: int = 0

    @property
    def final_losses(self) -> StepLosses | None:
        return self.losses[-1] if self.losses else None

    def summary(self) -> dict:
        """What a bank's manifest (and a benchmark run) records of the step, JSON-safe (NaN: None): the final
        losses, the dev curve and the checkpoint kept on it, and how many examples and optimisation steps."""
        final = self.final_losses
        return {
            "final_losses": {k: json_number(v) for k, v in final._asdict().items()} if final else None,
            "best_dev_accuracy": json_number(self.best_dev_accuracy),
            "best_step": self.best_step,
            "dev_accuracy": [[step, json_number(acc)] for step, acc in self.dev_accuracy],
            "optimisation_steps": len(self.losses),
            "train_examples": self.train_examples,
            "dev_examples": self.dev_examples,
            "replay_examples": self.replay_examples,
        }


def _task_targets(batch, mode: str) -> int:
    """How many targets the task loss averages over: labelled rows (classifier) or answer tokens (instruction)."""
    if mode == "classifier":
        return int((batch.class_labels != -1).sum())
    return int((batch.lm_labels[:, 1:] != IGNORE_INDEX).sum())


def task_loss(net, mode: str, batch, task_id: str | None = None, denominator: float | None = None):
    """The task loss and the forward pass's output. `net` is the model, or its DDP wrapper.

    Classifier: the cross-entropy of each row's own task head (`task_id` for every row, or None: each row's
    task in `batch.tasks`, as in a batch with replayed rows of earlier tasks). Instruction: the LM loss on the answer tokens, with the LM head run
    only on the positions that predict them (`Batch.answer_window`). Discriminator-memory rows carry ignore
    labels in both. The mean over the batch's targets; with `denominator`, the sum divided by it (a share
    of a global batch).
    """
    reduction = "mean" if denominator is None else "sum"
    if mode == "classifier":
        out = net(batch.input_ids, batch.attention_mask, task_id=task_id or batch.tasks, output="classify")
        loss = F.cross_entropy(out.logits.float(), batch.class_labels, ignore_index=-1, reduction=reduction)
    else:
        window = batch.answer_window()
        out = net(batch.input_ids, batch.attention_mask, task_id=task_id, output="lm", keep_last=window)
        logits = out.logits.float()[:, :-1]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            batch.answer_targets(window).reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction=reduction,
        )
    return (loss if denominator is None else loss / denominator), out


def train_step(
    net,
    model: MoECLModel,
    batch,
    terms: list,
    optimizer,
    *,
    alpha: float = 0.0,
    discriminator_span: str = "all",
    denominator: float | None = None,
    share=None,
    accelerator=None,
) -> StepLosses:
    """One optimisation step on `batch`: the forward pass (through `net`: the model or its DDP wrapper) under
    the batch's routing, the task loss, the loss terms, backward, AdamW. Every trainer runs this: the loop
    (`fit`: a continual step, the benchmark's joint upper bound) and the benchmark's cost figures.

    `alpha`: the adversarial weight (the discriminators' logits are collected and reversed when it is > 0).
    Under several processes, `denominator` scales the task loss to the global batch and `share`
    (moecl.train.distributed.Share) weights the row-averaged terms; the returned losses are the global batch's.
    """
    net.train()
    with model.routed(
        batch.tasks,
        attention_mask=batch.discriminator_mask(discriminator_span),
        collect_discriminator=alpha > 0,
        reverse_scale=alpha,
    ) as routing:
        main_loss, _ = task_loss(net, model.mode, batch, None, denominator)
        named = {}
        for term in terms:
            out = term(model, batch, routing)
            if share is not None and getattr(term, "row_averaged", False):
                out = {k: v * share.row_weight for k, v in out.items()}
            named.update(out)
    if share is not None and share.empty:
        main_loss = main_loss * 0.0
    loss = main_loss + sum(named.values()) if named else main_loss
    optimizer.zero_grad(set_to_none=True)
    if accelerator is not None:
        accelerator.backward(loss)
    else:
        loss.backward()
    optimizer.step()
    l_task = float(main_loss.detach())
    l_adv = float(named["discriminator"].detach()) if "discriminator" in named else 0.0
    penalty = float(sum(v.detach() for k, v in named.items() if k != "discriminator")) if named else 0.0
    if share is not None:  # the global batch's losses: the mean over processes of the scaled shares
        device = main_loss.device
        global_losses = torch.tensor([l_task, l_adv, penalty], device=device)
        l_task, l_adv, penalty = accelerator.reduce(global_losses, reduction="mean").tolist()
    return StepLosses(
        total=l_task - alpha * l_adv + penalty, task=l_task, adversarial=-alpha * l_adv, discriminator=l_adv
    )


def replay_items(
    model: MoECLModel,
    tokenizer,
    replay: dict[str, TaskData],
    current_task: str,
    per_task: int,
    params: Params,
) -> list[Encoded]:
    """`per_task` TRAINING records of each earlier task the model knows (a seeded stratified sample of
    `replay[task].train`; never its test or dev split), encoded for that task, to train on beside the current
    task's records. Each row is routed through its own task's experts and scored with its own labels."""
    items = []
    for task_id in model.task_ids:
        if task_id == current_task or task_id not in replay or per_task <= 0:
            continue
        info = model.task(task_id)
        encoder = Encoder(
            tokenizer, task_id, info.labels, info.instruction, model.mode, params.train.max_length
        )
        for record in stratified_sample(replay[task_id].train, per_task, params.train.seed):
            items.append(encoder.encode(record.text, record.label))
    return items


def optimizer_groups(model: MoECLModel, task_id: str, trainable: list, method, lr: float) -> list[dict]:
    """One AdamW group at `lr`, plus one for the shared expert at `method.shared_lr_scale` x lr and one for the
    gate at `method.gate_lr_scale` x lr where those differ from 1."""
    scaled = []
    if method.uses_shared and method.shared_lr_scale != 1.0:
        scaled.append((model.shared_expert_parameters(task_id), method.shared_lr_scale))
    if method.uses_gate and method.gate_lr_scale != 1.0:
        scaled.append((model.gate_parameters(task_id), method.gate_lr_scale))
    if not scaled:
        return [{"params": trainable}]
    ids = [{id(p) for p in params} for params, _ in scaled]
    groups = [{"params": [p for p in trainable if not any(id(p) in i for i in ids)]}]
    for i, (_, scale) in zip(ids, scaled):
        groups.append({"params": [p for p in trainable if id(p) in i], "lr": lr * scale})
    return groups


def dev_accuracy(
    model: MoECLModel, tokenizer, task_id: str, records: list[Record], params: Params, accelerator=None
) -> float:
    """Accuracy on the dev records. With several processes, each predicts whole evaluation batches (the same
    batches one process would run) round-robin, and the correct counts are summed: every process gets the same
    number."""
    bs = params.evaluate.batch_size

    def labels(recs: list[Record]) -> list[str]:
        if not recs:
            return []
        return [p.label for p in task_predictions(model, tokenizer, task_id, recs, params)]

    if accelerator is None or accelerator.num_processes == 1 or not records:
        return accuracy(labels(records), [r.label for r in records])
    chunks = [records[i : i + bs] for i in range(0, len(records), bs)]
    mine = [r for chunk in chunks[accelerator.process_index :: accelerator.num_processes] for r in chunk]
    correct = sum(p == r.label for p, r in zip(labels(mine), mine))
    total = accelerator.reduce(torch.tensor([correct], device=accelerator.device), reduction="sum")
    return int(total.item()) / len(records)


def task_items(model: MoECLModel, tokenizer, task: TaskData, cfg) -> tuple[list[Encoded], list[Record]]:
    """The task's encoded training rows and its dev records (the task's own dev split, else carved from train)."""
    records = stratified_sample(task.train, cfg.max_train_examples, cfg.seed)
    if task.dev:
        train_records, dev_records = records, list(task.dev)
    else:
        train_records, dev_records = split_dev(records, cfg.dev_fraction, cfg.seed)
    encoder = Encoder(tokenizer, task.task_id, task.labels, task.instruction, model.mode, cfg.max_length)
    return [encoder.encode(r.text, r.label) for r in train_records], dev_records


def train_on_task(
    model: MoECLModel,
    tokenizer,
    task: TaskData,
    params: Params,
    *,
    memory: dict[str, list[list[int]]] | None = None,
    replay: dict[str, TaskData] | None = None,
    progress: bool = True,
    accelerator=None,
) -> TrainOutcome:
    """Train the task's trainable set (shared expert, its dedicated expert and head, gates, discriminators).

    `replay`: earlier tasks' data; with method.replay_per_task > 0 that many of each one's training records
    join the training set (`replay_items`), through the task loss. Dev selection stays on the current task.

    `accelerator`: an accelerate.Accelerator to train with (data parallel over its processes, mixed precision);
    under a distributed launch one is made when none is given; otherwise the plain single-process loop.
    """
    cfg, method = params.train, params.method
    if accelerator is None and under_distributed_launch():
        accelerator = make_accelerator(cfg.mixed_precision)
    items, dev_records = task_items(model, tokenizer, task, cfg)
    replayed = replay_items(model, tokenizer, replay or {}, task.task_id, method.replay_per_task, params)
    terms = build_terms(model, task.task_id, method, memory=memory, batch_size=cfg.batch_size, seed=cfg.seed)
    alpha = method.adversarial_weight if model.has_discriminator else 0.0
    trainable = model.trainable_parameters(task.task_id)
    groups = optimizer_groups(model, task.task_id, trainable, method, cfg.lr)
    outcome = fit(
        model,
        tokenizer,
        items + replayed,
        {task.task_id: dev_records},
        params,
        groups,
        terms=terms,
        alpha=alpha,
        progress=progress,
        desc=f"train {task.task_id}",
        accelerator=accelerator,
    )
    outcome.train_examples, outcome.dev_examples = len(items), len(dev_records)
    outcome.replay_examples = len(replayed)
    return outcome


def fit(
    model: MoECLModel,
    tokenizer,
    items: list[Encoded],
    dev: dict[str, list[Record]],
    params: Params,
    groups: list[dict],
    *,
    terms=(),
    alpha: float = 0.0,
    progress: bool = True,
    desc: str = "train",
    accelerator=None,
) -> TrainOutcome:
    """The training loop: `epochs` passes over `items` in seeded shuffled batches, each one `train_step` with
    AdamW over `groups` (the parameters trained, nothing else), the mean accuracy over `dev` (task -> records)
    checked `evals_per_epoch` times an epoch and the best checkpoint kept. A continual step fits one task's
    rows (`train_on_task`); the benchmark's joint upper bound fits every task's rows at once.
    """
    cfg, method = params.train, params.method
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    trainable = [p for group in groups for p in group["params"]]
    for p in model.parameters():  # exactly what `groups` holds learns
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    pad = pad_id(tokenizer)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    net = model  # what the training forward passes go through: the model, or its DDP wrapper
    if accelerator is not None:
        net, optimizer = accelerator.prepare(model, optimizer)  # moves the model to the process's device
        if rank > 0:  # dropout: each process its own masks (the batch order has its own generator below)
            torch.manual_seed(cfg.seed + rank)
    device = model.layers[0].base.down_proj.weight.device
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = max(1, math.ceil(len(items) / cfg.batch_size))
    eval_every = max(1, steps_per_epoch // max(1, cfg.evals_per_epoch))
    total_steps = steps_per_epoch * cfg.epochs
    outcome = TrainOutcome()
    best_state: list[torch.Tensor] | None = None

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, desc=desc, disable=not progress, leave=False)
    step = 0
    for _epoch in range(cfg.epochs):
        order = torch.randperm(len(items), generator=generator).tolist()
        for start in range(0, len(order), cfg.batch_size):
            batch_items = [items[i] for i in order[start : start + cfg.batch_size]]
            # rows some terms add to every batch (the discriminator memory): the same draws on every process
            extra = [row for term in terms if hasattr(term, "before_batch") for row in term.before_batch()]
            batch = collate(batch_items + extra, pad, [True] * len(batch_items) + [False] * len(extra))
            denominator = None
            if world > 1:  # this process's rows; losses scaled so that DDP's average is the global batch's
                share = share_of(len(batch.tasks), rank, world)
                denominator = _task_targets(batch, model.mode) / world
                batch = batch.select(share.rows)
            batch = batch.to(device)
            losses = train_step(
                net,
                model,
                batch,
                terms,
                optimizer,
                alpha=alpha,
                discriminator_span=method.discriminator_span,
                denominator=denominator,
                share=share if world > 1 else None,
                accelerator=accelerator,
            )
            step += 1
            outcome.losses.append(losses)
            bar.update(1)
            bar.set_postfix(task=f"{losses.task:.3f}", disc=f"{losses.discriminator:.3f}")
            if any(dev.values()) and (step % eval_every == 0 or step == total_steps):
                scores = [
                    dev_accuracy(model, tokenizer, task_id, records, params, accelerator)
                    for task_id, records in dev.items()
                    if records
                ]
                acc = sum(scores) / len(scores)
                outcome.dev_accuracy.append((step, acc))
                if best_state is None or acc > outcome.best_dev_accuracy:
                    outcome.best_dev_accuracy, outcome.best_step = acc, step
                    best_state = [p.detach().clone() for p in trainable]
    bar.close()
    if best_state is not None:
        with torch.no_grad():
            for p, saved in zip(trainable, best_state):
                p.copy_(saved)
    else:
        outcome.best_step = step
    if accelerator is not None:
        accelerator.unwrap_model(net, keep_fp32_wrapper=False)  # gives the model back its own forward
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return outcome
