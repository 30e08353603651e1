"""A LoRA delta and an expert (LoRA deltas on a layer's FFN projections).

Our own module rather than peft's LoraLayer: MoE-CL needs the base projection computed ONCE and each expert's
low-rank delta added separately, under a token-wise gate, which peft's layers do not expose.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_DROP_LEVELS = 65536  # keep masks drawn as 16-bit integers: p is rounded to a multiple of 1/65536


def keep_mask(like: torch.Tensor, p: float) -> torch.Tensor | None:
    """Inverted-dropout multiplier for a tensor shaped like `like`: 0 with probability p, else 1/(1-p).

    None when p is 0. On CPU the mask comes from 16-bit slices of int64 draws, four elements per random
    number: torch's CPU bernoulli_ draws one Mersenne-Twister number per element, which made dropout a fifth of
    a LoRA training step. Elsewhere torch's own bernoulli_. Both use torch's seeded generator.
    """
    if p <= 0.0:
        return None
    if like.device.type != "cpu":
        return torch.empty_like(like).bernoulli_(1.0 - p).div_(1.0 - p)
    dropped = round(p * _DROP_LEVELS)
    n = like.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=like.device)
    bits = words.view(torch.int16)[:n].view(like.shape)
    keep = 1.0 - dropped / _DROP_LEVELS
    return (bits >= dropped - _DROP_LEVELS // 2).to(like.dtype).mul_(1.0 / keep)


class LoraDelta(nn.Module):
    """scale * B(A(x)), A kaiming-uniform, B zero: a fresh delta is exactly zero.

    Dropout on x is applied by the caller (MoEFeedForward), once per input for every expert that reads it.
    """

    def __init__(self, in_features: int, out_features: int, r: int, scale: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # scaled at rank r, not on the (up to 1536-wide) output: the multiply costs r/out of the other order
        return ((x.to(self.A.dtype) @ self.A.t()) * self.scale) @ self.B.t()


PROJECTION_SHAPES = {  # projection -> (input is hidden?, output is hidden?)
    "gate_proj": ("hidden", "intermediate"),
    "up_proj": ("hidden", "intermediate"),
    "down_proj": ("intermediate", "hidden"),
}


class Expert(nn.ModuleDict):
    """One expert of one layer: a LoRA delta on each targeted FFN projection."""

    def __init__(self, hidden: int, intermediate: int, targets: list[str], r: int, scale: float):
        sizes = {"hidden": hidden, "intermediate": intermediate}
        super().__init__(
            {
                name: LoraDelta(
                    sizes[PROJECTION_SHAPES[name][0]], sizes[PROJECTION_SHAPES[name][1]], r, scale
                )
                for name in targets
            }
        )
