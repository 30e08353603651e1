"""The MoE-CL feed-forward block: a frozen SwiGLU FFN, LoRA experts, a token-wise gate, a task discriminator.

Each expert e is the full FFN with its own deltas, FFN_e(u) = (W2 + dW2_e) act((W1 + dW1_e) u) * ((W3 + dW3_e) u).
The gate's weights are per-token scalars and W2 is linear, so
    beta_s FFN_s(u) + beta_t FFN_t(u) = W2 (beta_s h_s + beta_t h_t) + beta_s dW2_s h_s + beta_t dW2_t h_t:
the base projections run once per token and only the small deltas run per expert. The discriminator reads the
shared expert's output mean-pooled over non-pad tokens; that is linear in h_s too, so it costs one projection
of a pooled vector per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moecl.model.lora import Expert, keep_mask


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


def gradient_reversal(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; the gradient flowing back is multiplied by -scale (DANN's reversal layer)."""
    return _GradientReversal.apply(x, scale)


RowGroups = list[tuple[tuple[str, ...], "torch.Tensor | None"]]


def group_rows(per_sample: list[tuple[str, ...]], device: torch.device) -> RowGroups:
    """Rows that use the same experts, grouped; a single group covering every row needs no indexing."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for row, names in enumerate(per_sample):
        groups.setdefault(tuple(names), []).append(row)
    if len(groups) == 1:
        return [(next(iter(groups)), None)]
    return [(names, torch.tensor(rows, device=device)) for names, rows in groups.items()]


@dataclass
class Routing:
    """What every MoE-CL layer needs to know about the current forward pass (set once by the wrapper)."""

    branches: list[RowGroups] = field(
        default_factory=list
    )  # 1 branch (plain) or 2 (shared, dedicated: gated)
    gated: bool = False
    disabled: bool = False  # run the bare base FFN (the untrained model)
    token_mask: torch.Tensor | None = None  # [B, L] 1 for real tokens, for the discriminator's pooling
    collect_discriminator: bool = False
    reverse_scale: float = 0.0
    discriminator_logits: list[torch.Tensor] = field(default_factory=list)


class MoEFeedForward(nn.Module):
    """Replaces one decoder layer's `mlp`. The wrapped base FFN is frozen and never modified."""

    def __init__(self, base_mlp: nn.Module, hidden: int, intermediate: int, routing: Routing):
        super().__init__()
        self.base = base_mlp
        self.hidden = hidden
        self.intermediate = intermediate
        self.experts = nn.ModuleDict()
        self.gate: nn.Linear | None = None  # one gate for every task (the paper)
        self.task_gates = nn.ModuleDict()  # or one gate per task, keyed like its expert (method.task_gates)
        self.discriminator: nn.Linear | None = None
        # Dropout on the experts' inputs: one mask per input, shared by every expert that reads it (each
        # expert still sees dropped inputs; drawing the masks is most of dropout's cost). The newest expert's rate.
        self.dropout = 0.0
        self.down_targeted = False  # does any expert carry a down_proj delta (then its input needs a mask)
        # A plain attribute (not a submodule): one Routing object is shared by every layer of the model.
        object.__setattr__(self, "routing", routing)

    # --- structure -------------------------------------------------------------------------------------
    def add_expert(self, name: str, targets: list[str], r: int, scale: float, dropout: float) -> Expert:
        expert = Expert(self.hidden, self.intermediate, targets, r, scale)
        self.experts[name] = expert.to(self.base.down_proj.weight.device)
        self.dropout = dropout
        self.down_targeted = self.down_targeted or "down_proj" in expert
        return expert

    def add_gate(self, bias: float = 0.0) -> None:
        """The paper's gate, Linear(d -> 2, no bias), N(0, 0.02); with `bias`, a bias initialised to (0, bias), so
        that beta_t starts near sigmoid(bias) on every token."""
        self.gate = nn.Linear(self.hidden, 2, bias=bool(bias), device=self.base.down_proj.weight.device)
        nn.init.normal_(self.gate.weight, std=0.02)
        if bias:
            with torch.no_grad():
                self.gate.bias.copy_(torch.tensor([0.0, bias]))

    def add_task_gate(self, name: str, bias: float, seed: int) -> nn.Linear:
        """A gate of its own for the task whose expert is `name` (same init as `add_gate`, from its own seeded
        generator so that adding it leaves every other random draw as it was)."""
        gate = torch.nn.utils.skip_init(
            nn.Linear, self.hidden, 2, bias=bool(bias), device=self.base.down_proj.weight.device
        )
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=generator) * 0.02)
            if bias:
                gate.bias.copy_(torch.tensor([0.0, bias]))
        self.task_gates[name] = gate
        return gate

    def grow_discriminator(self, num_tasks: int, seed: int) -> None:
        """Linear(d -> T) with one row per known task; earlier rows are kept when a task is added.

        The init N(0, 0.02) comes from its own generator (`seed`), not torch's global one: adding discriminators
        leaves every other random draw (expert init, dropout masks) as it was, so moecl and moecl_nogan differ by
        the adversarial term alone."""
        old = self.discriminator
        device = self.base.down_proj.weight.device
        new = torch.nn.utils.skip_init(nn.Linear, self.hidden, num_tasks, bias=False, device=device)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            new.weight.copy_(torch.randn(new.weight.shape, generator=generator) * 0.02)
            if old is not None:
                new.weight[: old.out_features].copy_(old.weight)
        self.discriminator = new

    # --- compute ---------------------------------------------------------------------------------------
    def _delta(self, projection: str, x: torch.Tensor, groups: RowGroups) -> torch.Tensor | None:
        """Sum of the deltas of each row's experts on `projection`, or None when no expert targets it.

        Row groups (a batch mixing tasks, e.g. discriminator-memory rows) write their rows of one output
        in place: one allocation per projection, however many groups.
        """
        out = None
        for names, rows in groups:
            d = self._experts_delta(names, projection, x if rows is None else x.index_select(0, rows))
            if d is None:
                continue
            if rows is None:  # one group covers every row (group_rows)
                return d
            if out is None:
                out = d.new_zeros(x.shape[:-1] + d.shape[-1:])
            out.index_copy_(0, rows, d)
        return out

    @staticmethod
    def _group_inputs(x: torch.Tensor, groups: RowGroups) -> list[torch.Tensor]:
        """Each row group's rows of `x`, selected once for every projection that reads them."""
        return [x if rows is None else x.index_select(0, rows) for _, rows in groups]

    def _plus_delta(self, base_out: torch.Tensor, projection: str, inputs: list, groups: RowGroups):
        """base_out + each row's experts' deltas on `projection` (`inputs`: `_group_inputs` of their input).

        Row groups add their delta into a copy of base_out, row by row: the same float sums as base_out + a
        delta assembled in a tensor of zeros, without that tensor, and with a backward that hands each group
        its rows of the gradient instead of zero-filling copies of it (a replayed batch's step was 15% slower).
        """
        if groups[0][1] is None:  # one group covers every row (group_rows)
            return self._add(base_out, self._experts_delta(groups[0][0], projection, inputs[0]))
        out = None
        for (names, rows), xs in zip(groups, inputs):
            d = self._experts_delta(names, projection, xs)
            if d is not None:
                out = base_out.clone() if out is None else out
                out.index_add_(0, rows, d.to(out.dtype))
        return base_out if out is None else out

    def _experts_delta(self, names: tuple[str, ...], projection: str, x: torch.Tensor) -> torch.Tensor | None:
        """The sum of the named experts' deltas on `projection`, or None when none of them targets it."""
        deltas = [self.experts[n][projection] for n in names if projection in self.experts[n]]
        if not deltas:
            return None
        d = deltas[0](x)
        for extra in deltas[1:]:
            d = d + extra(x)
        return d

    @staticmethod
    def _add(base: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        if delta is None:
            return base
        if not torch.is_grad_enabled() and delta.dtype == base.dtype:
            return delta.add_(base)  # inference: the delta is a fresh tensor of ours, reuse its buffer
        return base + delta.to(base.dtype)

    @staticmethod
    def _swiglu(act_fn, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """act(g) * v; in inference, multiplied into act(g)'s own fresh buffer."""
        a = act_fn(g)
        if not torch.is_grad_enabled() and a is not g and a is not v:
            return a.mul_(v)
        return a * v

    @staticmethod
    def _lora_input(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return x if mask is None else x * mask

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        routing = self.routing
        base = self.base
        if routing.disabled or not routing.branches:
            return base(u)
        p = self.dropout if self.training else 0.0
        u_lora = self._lora_input(u, keep_mask(u, p))
        gate_base = base.gate_proj(u)
        up_base = base.up_proj(u)
        hiddens = []
        for groups in routing.branches:
            inputs = self._group_inputs(u_lora, groups)
            g = self._plus_delta(gate_base, "gate_proj", inputs, groups)
            v = self._plus_delta(up_base, "up_proj", inputs, groups)
            hiddens.append(self._swiglu(base.act_fn, g, v))
        down_mask = None
        if p > 0 and self.down_targeted:
            down_mask = keep_mask(hiddens[0], p)
        lora_hiddens = [self._lora_input(h, down_mask) for h in hiddens]

        if routing.gated:
            beta = torch.softmax(self._gate_logits(u, routing.branches[1]), dim=-1).to(u.dtype)
            beta_s, beta_t = beta[..., 0:1], beta[..., 1:2]
            h_s, h_t = hiddens
            d_s = self._delta("down_proj", lora_hiddens[0], routing.branches[0])
            d_t = self._delta("down_proj", lora_hiddens[1], routing.branches[1])
            if torch.is_grad_enabled():  # fused: fewer full-width passes
                out = base.down_proj(torch.addcmul(beta_s * h_s, beta_t, h_t))
                for beta_e, d_e in ((beta_s, d_s), (beta_t, d_t)):
                    out = out if d_e is None else torch.addcmul(out, beta_e, d_e.to(out.dtype))
            else:  # inference: the same operations in place, in buffers of ours (h_s, h_t: `_swiglu`'s own;
                # the down deltas already read them), so no full-width tensor is allocated for the mixing
                out = base.down_proj(h_s.mul_(beta_s).addcmul_(beta_t, h_t))
                for beta_e, d_e in ((beta_s, d_s), (beta_t, d_t)):
                    out = out if d_e is None else out.addcmul_(beta_e, d_e.to(out.dtype))
        else:
            out = self._add(
                base.down_proj(hiddens[0]), self._delta("down_proj", lora_hiddens[0], routing.branches[0])
            )

        if routing.collect_discriminator and self.discriminator is not None:
            routing.discriminator_logits.append(self._discriminate(hiddens[0], lora_hiddens[0], routing))
        return out

    def _gate_logits(self, u: torch.Tensor, dedicated: RowGroups) -> torch.Tensor:
        """[.., 2] gate logits: the one gate, or each row group's own task gate (the dedicated branch's groups
        are one expert each, and a task gate is keyed like its expert)."""
        if self.gate is not None:
            return self.gate(u.to(self.gate.weight.dtype))
        out = None
        for (name,), rows in dedicated:
            gate = self.task_gates[name]
            if rows is None:
                return gate(u.to(gate.weight.dtype))
            logits = gate(u.index_select(0, rows).to(gate.weight.dtype))
            out = logits.new_zeros(u.shape[:-1] + (2,)) if out is None else out
            out = out.index_copy(0, rows, logits)
        return out

    def _discriminate(
        self, h_shared: torch.Tensor, h_shared_lora: torch.Tensor, routing: Routing
    ) -> torch.Tensor:
        """The shared expert's output, mean-pooled over real tokens, through the (reversed) discriminator.
        Pooling commutes with the linear down projection, so both are pooled first; the delta reads the same
        dropped-out input as in the main path."""
        mask = routing.token_mask.to(h_shared.dtype).unsqueeze(-1)
        count = mask.sum(dim=1).clamp(min=1.0)
        pooled = (h_shared * mask).sum(dim=1) / count
        pooled_lora = pooled if h_shared_lora is h_shared else (h_shared_lora * mask).sum(dim=1) / count
        shared_out = self._add(
            self.base.down_proj(pooled), self._delta("down_proj", pooled_lora, routing.branches[0])
        )
        reversed_out = gradient_reversal(
            shared_out.to(self.discriminator.weight.dtype), routing.reverse_scale
        )
        return self.discriminator(reversed_out)
