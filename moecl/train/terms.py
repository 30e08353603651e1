"""Loss terms that plug into the training loop, each small and testable alone.

A term sees the model and the batch after the forward pass and returns named losses to add to the total.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moecl.model.moecl_model import SHARED, MoECLModel, expert_name


class AdversarialTerm:
    """L_adv: cross-entropy of every layer's task discriminator on LOGITS (not probabilities).

    The discriminators minimise it; the gradient-reversal layer in front of them hands the shared expert (and
    everything upstream) -alpha times that gradient, so the generator's objective is L_task - alpha * L_adv.
    Added to the loss with weight 1: the sign and alpha live in the reversal layer.
    """

    def __init__(self, alpha: float):
        self.alpha = alpha

    def __call__(self, model: MoECLModel, batch, routing) -> dict[str, torch.Tensor]:
        logits = routing.discriminator_logits
        if not logits:
            return {}
        labels = torch.tensor([model.task_index(t) for t in batch.tasks], device=logits[0].device)
        l_adv = torch.stack([F.cross_entropy(layer_logits, labels) for layer_logits in logits]).mean()
        return {"discriminator": l_adv}


class OrthogonalSubspaceTerm:
    """O-LoRA: keep the new expert's A rows orthogonal to every earlier expert's (L1 of A_new A_old^T), plus an
    optional L2 penalty on the new expert."""

    def __init__(self, task_id: str, lambda_orth: float, lambda_l2: float):
        self.task_id = task_id
        self.lambda_orth = lambda_orth
        self.lambda_l2 = lambda_l2

    def __call__(self, model: MoECLModel, batch, routing) -> dict[str, torch.Tensor]:
        new = expert_name(self.task_id)
        olds = [expert_name(t) for t in model.task_ids if t != self.task_id]
        orth = torch.zeros(())
        l2 = torch.zeros(())
        for layer in model.layers:
            for proj, delta in layer.experts[new].items():
                for old in olds:
                    orth = orth + (delta.A @ layer.experts[old][proj].A.t()).abs().sum()
                if self.lambda_l2:
                    l2 = l2 + delta.A.pow(2).sum() + delta.B.pow(2).sum()
        out = {"orthogonality": self.lambda_orth * orth}
        if self.lambda_l2:
            out["l2"] = self.lambda_l2 * l2
        return out


def build_terms(model: MoECLModel, task_id: str, method) -> list:
    terms = []
    if model.has_discriminator and method.adversarial_weight > 0:
        terms.append(AdversarialTerm(method.adversarial_weight))
    if method.name == "o_lora" and len(model.task_ids) > 1:
        terms.append(OrthogonalSubspaceTerm(task_id, method.o_lora_lambda_orth, method.o_lora_lambda_l2))
    return terms


__all__ = ["AdversarialTerm", "OrthogonalSubspaceTerm", "build_terms", "SHARED"]
