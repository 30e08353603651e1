"""The training loop of one continual-learning step: one task, plain AdamW, best dev checkpoint kept."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from moecl.config import Params
from moecl.data.task import Record, TaskData
from moecl.metrics import accuracy
from moecl.model.encoding import Encoded, Encoder, collate, pad_id
from moecl.model.inference import predict
from moecl.model.moecl_model import MoECLModel
from moecl.sampling import split_dev, stratified_sample
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

    @property
    def final_losses(self) -> StepLosses | None:
        return self.losses[-1] if self.losses else None


class MemorySampler:
    """Draws discriminator-only examples from earlier tasks' memory (stored prompt token ids, no labels).

    Each batch gets ceil(batch_size / 2) memory rows spread over the earlier tasks; they are routed through
    their own task's experts, give the discriminator a second class to separate, and never enter the task
    loss (their class and LM labels are ignore indices).
    """

    def __init__(self, memory: dict[str, list[list[int]]], current_task: str, batch_size: int, seed: int):
        self.pools = {t: ids for t, ids in memory.items() if t != current_task and ids}
        self.per_batch = math.ceil(batch_size / 2) if self.pools else 0
        self.rng = random.Random(seed)

    def draw(self) -> list[Encoded]:
        tasks = sorted(self.pools)
        out = []
        for i in range(self.per_batch):
            task = tasks[i % len(tasks)]
            ids = self.rng.choice(self.pools[task])
            out.append(Encoded(list(ids), len(ids), -1, task))
        return out


def _task_loss(model: MoECLModel, batch, task_id: str) -> torch.Tensor:
    if model.mode == "classifier":
        logits = model.classify(batch.input_ids, batch.attention_mask, task_id)
        return F.cross_entropy(logits.float(), batch.class_labels, ignore_index=-1)
    logits = model.lm_logits(batch.input_ids, batch.attention_mask).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.lm_labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def dev_accuracy(model: MoECLModel, tokenizer, task_id: str, records: list[Record], params: Params) -> float:
    preds = predict(model, tokenizer, task_id, [r.text for r in records], max_length=params.train.max_length,
                    batch_size=params.evaluate.batch_size, instruction_eval=params.evaluate.instruction_eval,
                    max_new_tokens=params.evaluate.max_new_tokens)
    return accuracy([p.label for p in preds], [r.label for r in records])


def train_on_task(model: MoECLModel, tokenizer, task: TaskData, params: Params, *,
                  memory: dict[str, list[list[int]]] | None = None, progress: bool = True) -> TrainOutcome:
    """Train the task's trainable set (shared expert, its dedicated expert and head, gates, discriminators)."""
    cfg, method = params.train, params.method
    device = model.layers[0].base.down_proj.weight.device
    records = stratified_sample(task.train, cfg.max_train_examples, cfg.seed)
    if task.dev:
        train_records, dev_records = records, list(task.dev)
    else:
        train_records, dev_records = split_dev(records, cfg.dev_fraction, cfg.seed)
    encoder = Encoder(tokenizer, task.task_id, task.labels, task.instruction, model.mode, cfg.max_length)
    items = [encoder.encode(r.text, r.label) for r in train_records]
    pad = pad_id(tokenizer)
    terms = build_terms(model, task.task_id, method)
    alpha = method.adversarial_weight if model.has_discriminator else 0.0
    sampler = MemorySampler(memory or {}, task.task_id, cfg.batch_size, cfg.seed) if alpha > 0 else None

    trainable = model.trainable_parameters(task.task_id)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = max(1, math.ceil(len(items) / cfg.batch_size))
    eval_every = max(1, steps_per_epoch // max(1, cfg.evals_per_epoch))
    total_steps = steps_per_epoch * cfg.epochs
    outcome = TrainOutcome(train_examples=len(items), dev_examples=len(dev_records))
    best_state: list[torch.Tensor] | None = None

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, desc=f"train {task.task_id}", disable=not progress, leave=False)
    step = 0
    for _epoch in range(cfg.epochs):
        order = torch.randperm(len(items), generator=generator).tolist()
        for start in range(0, len(order), cfg.batch_size):
            batch_items = [items[i] for i in order[start: start + cfg.batch_size]]
            extra = sampler.draw() if sampler else []
            batch = collate(batch_items + extra, pad, [True] * len(batch_items) + [False] * len(extra)).to(device)
            model.train()
            with model.routed(batch.tasks, attention_mask=batch.attention_mask, collect_discriminator=alpha > 0,
                              reverse_scale=alpha) as routing:
                task_loss = _task_loss(model, batch, task.task_id)
                named = {}
                for term in terms:
                    named.update(term(model, batch, routing))
            loss = task_loss + sum(named.values()) if named else task_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            l_adv = float(named["discriminator"].detach()) if "discriminator" in named else 0.0
            penalty = float(sum(v.detach() for k, v in named.items() if k != "discriminator")) if named else 0.0
            losses = StepLosses(total=float(task_loss.detach()) - alpha * l_adv + penalty,
                                task=float(task_loss.detach()), adversarial=-alpha * l_adv, discriminator=l_adv)
            outcome.losses.append(losses)
            bar.update(1)
            bar.set_postfix(task=f"{losses.task:.3f}", disc=f"{losses.discriminator:.3f}")
            if dev_records and (step % eval_every == 0 or step == total_steps):
                acc = dev_accuracy(model, tokenizer, task.task_id, dev_records, params)
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
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return outcome
