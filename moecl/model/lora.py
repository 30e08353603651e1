"""A LoRA delta and an expert (LoRA deltas on a layer's FFN projections).

Our own module rather than peft's LoraLayer: MoE-CL needs the base projection computed ONCE and each expert's
low-rank delta added separately, under a token-wise gate, which peft's layers do not expose.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoraDelta(nn.Module):
    """scale * B(A(dropout(x))), A kaiming-uniform, B zero: a fresh delta is exactly zero."""

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, dropout: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.A.dtype))
        return (x @ self.A.t() @ self.B.t()) * self.scale


PROJECTION_SHAPES = {  # projection -> (input is hidden?, output is hidden?)
    "gate_proj": ("hidden", "intermediate"),
    "up_proj": ("hidden", "intermediate"),
    "down_proj": ("intermediate", "hidden"),
}


class Expert(nn.ModuleDict):
    """One expert of one layer: a LoRA delta on each targeted FFN projection."""

    def __init__(
        self, hidden: int, intermediate: int, targets: list[str], r: int, scale: float, dropout: float
    ):
        sizes = {"hidden": hidden, "intermediate": intermediate}
        super().__init__(
            {
                name: LoraDelta(
                    sizes[PROJECTION_SHAPES[name][0]], sizes[PROJECTION_SHAPES[name][1]], r, scale, dropout
                )
                for name in targets
            }
        )
