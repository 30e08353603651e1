"""Loss terms that plug into the training loop, each small and testable alone.

A term sees the model and the batch after the forward pass and returns named losses to add to the total.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from moecl.model.encoding import Encoded
from moecl.model.moecl_model import SHARED, MoECLModel, expert_name, shared_chunk_name


class AdversarialTerm:
    """L_adv: cross-entropy of every layer's task discriminator on LOGITS (not probabilities).

    The discriminators minimise it; the gradient-reversal layer in front of them hands the shared expert (and
    everything upstream) -alpha times that gradient, so the generator's objective is L_task - alpha * L_adv.
    Added to the loss with weight 1: the sign and alpha live in the reversal layer.
    """

    row_averaged = True  # a mean over the batch's rows: a process's share is weighted by its rows (DDP)

    def __init__(self, alpha: float):
        self.alpha = alpha

    def __call__(self, model: MoECLModel, batch, routing) -> dict[str, torch.Tensor]:
        logits = routing.discriminator_logits
        if not logits:
            return {}
        labels = torch.tensor([model.task_index(t) for t in batch.tasks], device=logits[0].device)
        l_adv = torch.stack([F.cross_entropy(layer_logits, labels) for layer_logits in logits]).mean()
        return {"discriminator": l_adv}


class MemorySampler:  # a term that only adds rows: its loss is the adversarial term's
    """Draws discriminator-only examples from earlier tasks' memory (stored prompt token ids, no labels).

    Each batch gets ceil(batch_size / 2) memory rows spread over the earlier tasks; they are routed through
    their own task's experts, give the discriminator a second class to separate, and never enter the task
    loss (their class and LM labels are ignore indices).
    """

    def __init__(self, memory: dict[str, list[list[int]]], current_task: str, batch_size: int, seed: int):
        self.pools = {t: ids for t, ids in memory.items() if t != current_task and ids}
        self.per_batch = math.ceil(batch_size / 2) if self.pools else 0
        self.rng = random.Random(seed)

    def __call__(self, model, batch, routing) -> dict[str, torch.Tensor]:
        return {}

    def before_batch(self) -> list[Encoded]:
        """The memory rows to add to the next batch."""
        tasks = sorted(self.pools)
        out = []
        for i in range(self.per_batch):
            task = tasks[i % len(tasks)]
            ids = self.rng.choice(self.pools[task])
            out.append(Encoded(list(ids), len(ids), -1, task))
        return out


class OrthogonalSubspaceTerm:
    """O-LoRA: keep the new expert's A rows orthogonal to every earlier expert's (L1 of A_new A_old^T), plus an
    optional L2 penalty on the new expert. The same term keeps a new chunk of the shared expert orthogonal to
    its earlier chunks (method.shared_orthogonal)."""

    def __init__(self, new: str, olds: list[str], lambda_orth: float, lambda_l2: float = 0.0, name: str = ""):
        self.new = new
        self.olds = olds
        self.lambda_orth = lambda_orth
        self.lambda_l2 = lambda_l2
        self.name = name or "orthogonality"

    def __call__(self, model: MoECLModel, batch, routing) -> dict[str, torch.Tensor]:
        orth = torch.zeros(())
        l2 = torch.zeros(())
        for layer in model.layers:
            for proj, delta in layer.experts[self.new].items():
                for old in self.olds:
                    orth = orth + (delta.A @ layer.experts[old][proj].A.t()).abs().sum()
                if self.lambda_l2:
                    l2 = l2 + delta.A.pow(2).sum() + delta.B.pow(2).sum()
        out = {self.name: self.lambda_orth * orth}
        if self.lambda_l2:
            out["l2"] = self.lambda_l2 * l2
        return out


def build_terms(
    model: MoECLModel,
    task_id: str,
    method,
    *,
    memory: dict[str, list[list[int]]] | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> list:
    """The loss terms of a step on `task_id`: the adversarial term (with the discriminator memory's rows, where
    earlier tasks left some), O-LoRA's orthogonality, the shared chunks' orthogonality."""
    terms = []
    earlier = [t for t in model.task_ids if t != task_id]
    if model.has_discriminator and method.adversarial_weight > 0:
        terms.append(AdversarialTerm(method.adversarial_weight))
        if memory:
            terms.append(MemorySampler(memory, task_id, batch_size, seed))
    if method.spec.orthogonal_experts and earlier:
        terms.append(
            OrthogonalSubspaceTerm(
                expert_name(task_id),
                [expert_name(t) for t in earlier],
                method.o_lora_lambda_orth,
                method.o_lora_lambda_l2,
            )
        )
    if method.uses_shared and method.shared_orthogonal and earlier and method.shared_orth_lambda > 0:
        terms.append(
            OrthogonalSubspaceTerm(
                shared_chunk_name(task_id),
                [shared_chunk_name(t) for t in earlier],
                method.shared_orth_lambda,
                name="shared_orthogonality",
            )
        )
    return terms


__all__ = ["AdversarialTerm", "MemorySampler", "OrthogonalSubspaceTerm", "build_terms", "SHARED"]
