"""MoECLModel: installs MoE-CL feed-forward blocks into a Hugging Face causal LM and routes each forward pass.

Works with any decoder whose FFN has gate_proj/up_proj/down_proj and act_fn (Llama, Qwen2, Mistral, Gemma,
SmolLM). The base weights are frozen and never change. Which experts a forward pass uses depends on the method:
  moecl, moecl_nogan: shared expert + the sample's dedicated expert, mixed by the token-wise gate
  seq_lora:           the shared expert alone (one LoRA trained on every task in turn)
  per_task_lora:      the sample's dedicated expert alone
  o_lora:             the sum of every task's expert (task-agnostic, as in O-LoRA)
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from moecl.config import LoraSettings, MethodConfig
from moecl.errors import MoeclError, UnknownTaskError
from moecl.model.layer import MoEFeedForward, Routing, group_rows

SHARED = "shared"
# Base of the discriminators' own init seeds (+ 1000 x tasks known + layer index): see grow_discriminator
_DISCRIMINATOR_SEED = 7_000_000


# Base of the task gates' own init seeds (+ 1000 x tasks known + layer index)
_TASK_GATE_SEED = 8_000_000


def expert_name(task_id: str) -> str:
    return f"t_{task_id}"


def shared_chunk_name(task_id: str) -> str:
    """The shared expert's chunk learned on `task_id` (method.shared_orthogonal)."""
    return f"s_{task_id}"


@dataclass
class TaskInfo:
    task_id: str
    labels: list[str]
    instruction: str = ""
    positive_label: str | None = None


class MoECLOutput(NamedTuple):
    """What `MoECLModel.forward` returns: the logits, and the task discriminators' logits of every layer when the
    routing collects them (empty otherwise)."""

    logits: torch.Tensor
    discriminator_logits: tuple[torch.Tensor, ...] = ()


def _is_gated_ffn(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def install_moe_layers(base_model: nn.Module, routing: Routing) -> list[MoEFeedForward]:
    """Replace every gated FFN of the model with a MoEFeedForward wrapping it (in place, in layer order)."""
    targets = []
    for parent in base_model.modules():
        if isinstance(parent, MoEFeedForward):
            raise MoeclError("this model already has MoE-CL layers installed")
        for child_name, child in parent.named_children():
            if _is_gated_ffn(child):
                targets.append((parent, child_name, child))
    if not targets:
        raise MoeclError(
            "the base model has no gated feed-forward block (gate_proj/up_proj/down_proj): MoE-CL needs a "
            "Llama-style decoder (Llama, Qwen2, Mistral, Gemma, SmolLM)"
        )
    layers = []
    for parent, child_name, child in targets:
        layer = MoEFeedForward(child, child.gate_proj.in_features, child.gate_proj.out_features, routing)
        setattr(parent, child_name, layer)
        layers.append(layer)
    return layers


class MoECLModel(nn.Module):
    def __init__(self, base_model: nn.Module, lora: LoraSettings, method: MethodConfig):
        super().__init__()
        self.base_model = base_model
        self.lora = lora
        self.method = method
        for p in base_model.parameters():
            p.requires_grad_(False)
        # whether the base can project only the last positions (read once: lm_logits runs every step)
        self._takes_logits_to_keep = "logits_to_keep" in inspect.signature(base_model.forward).parameters
        self.routing = Routing()
        self.layers = install_moe_layers(base_model, self.routing)
        self.hidden_size = self.layers[0].hidden
        self.heads = nn.ModuleDict()
        self.tasks: list[TaskInfo] = []
        if method.uses_shared and not method.shared_orthogonal:
            for layer in self.layers:
                layer.add_expert(SHARED, lora.targets, lora.r, lora.scale, lora.dropout)
        if method.uses_gate and not method.task_gates:
            for layer in self.layers:
                layer.add_gate(method.gate_bias)

    # --- tasks ------------------------------------------------------------------------------------------
    @property
    def task_ids(self) -> list[str]:
        return [t.task_id for t in self.tasks]

    @property
    def has_discriminator(self) -> bool:
        return self.method.spec.adversarial

    @property
    def shared_names(self) -> tuple[str, ...]:
        """The experts whose sum is the shared expert: SHARED, or one orthogonal chunk per task."""
        if not self.method.uses_shared:
            return ()
        if self.method.shared_orthogonal:
            return tuple(shared_chunk_name(t) for t in self.task_ids)
        return (SHARED,)

    @property
    def mode(self) -> str:
        return self.method.mode

    def task(self, task_id: str) -> TaskInfo:
        for info in self.tasks:
            if info.task_id == task_id:
                return info
        known = ", ".join(self.task_ids) or "none"
        raise UnknownTaskError(f"unknown task {task_id!r}: this bank knows {known}")

    def task_index(self, task_id: str) -> int:
        return self.task_ids.index(task_id)

    def add_task(self, info: TaskInfo) -> None:
        """A new task: a fresh dedicated expert (B = 0, so nothing changes yet; with method.dedicated_init
        "shared", a copy of the shared expert, so that beta_s FFN_s + beta_t FFN_t starts at FFN_s whatever the
        gate; with "previous", a copy of the newest earlier task's expert) and, in classifier mode, a head."""
        if info.task_id in self.task_ids:
            raise MoeclError(f"task {info.task_id!r} is already in the bank")
        init, source = self.method.dedicated_init, None  # source: the expert the new one starts as, if any
        if init == "shared" and self.method.uses_shared:
            source = SHARED
        elif init == "previous" and self.tasks:
            source = expert_name(self.tasks[-1].task_id)
        self.tasks.append(info)
        lora = self.lora
        if self.method.uses_dedicated:
            for layer in self.layers:
                expert = layer.add_expert(
                    expert_name(info.task_id), lora.targets, lora.r, lora.scale, lora.dropout
                )
                if source is not None and source in layer.experts:
                    with torch.no_grad():
                        for name, p in expert.named_parameters():
                            p.copy_(layer.experts[source].get_parameter(name))
        if self.method.uses_shared and self.method.shared_orthogonal:
            for layer in self.layers:
                layer.add_expert(
                    shared_chunk_name(info.task_id), lora.targets, lora.r, lora.scale, lora.dropout
                )
        if self.method.uses_gate and self.method.task_gates:
            for i, layer in enumerate(self.layers):
                layer.add_task_gate(
                    expert_name(info.task_id),
                    self.method.gate_bias,
                    seed=_TASK_GATE_SEED + 1000 * len(self.tasks) + i,
                )
        if self.mode == "classifier":
            device = self.layers[0].base.down_proj.weight.device
            self.heads[info.task_id] = nn.Linear(self.hidden_size, len(info.labels), device=device)
        if self.has_discriminator:
            for i, layer in enumerate(self.layers):
                layer.grow_discriminator(
                    len(self.tasks), seed=_DISCRIMINATOR_SEED + 1000 * len(self.tasks) + i
                )

    # --- parameters -------------------------------------------------------------------------------------
    def shared_parameters(self) -> dict[str, nn.Parameter]:
        """The shared expert, the gate and the discriminators: what every step trains and every task reads."""
        out = {}
        for i, layer in enumerate(self.layers):
            if SHARED in layer.experts:
                for name, p in layer.experts[SHARED].named_parameters():
                    out[f"layers.{i}.shared.{name}"] = p
            if layer.gate is not None:
                for name, p in layer.gate.named_parameters():
                    out[f"layers.{i}.gate.{name}"] = p
            if layer.discriminator is not None:
                out[f"layers.{i}.discriminator.weight"] = layer.discriminator.weight
        return out

    def task_parameters(self, task_id: str) -> dict[str, nn.Parameter]:
        """What only `task_id`'s steps train: its dedicated expert, its gate and its chunk of the shared expert
        (where the method has them) and its head. Frozen once another task is learned."""
        self.task(task_id)
        out = {}
        name, chunk = expert_name(task_id), shared_chunk_name(task_id)
        for i, layer in enumerate(self.layers):
            if name in layer.experts:
                for pname, p in layer.experts[name].named_parameters():
                    out[f"layers.{i}.expert.{pname}"] = p
            if name in layer.task_gates:
                for pname, p in layer.task_gates[name].named_parameters():
                    out[f"layers.{i}.gate.{pname}"] = p
            if chunk in layer.experts:
                for pname, p in layer.experts[chunk].named_parameters():
                    out[f"layers.{i}.shared_chunk.{pname}"] = p
        if task_id in self.heads:
            for pname, p in self.heads[task_id].named_parameters():
                out[f"head.{pname}"] = p
        return out

    def shared_expert_parameters(self, task_id: str) -> list[nn.Parameter]:
        """The part of the shared expert that a step on `task_id` trains (method.shared_lr_scale applies to it)."""
        names = [SHARED] if SHARED in self.shared_names else [shared_chunk_name(task_id)]
        return [
            p
            for layer in self.layers
            for n in names
            if n in layer.experts
            for p in layer.experts[n].parameters()
        ]

    def gate_parameters(self, task_id: str) -> list[nn.Parameter]:
        """The gate that a step on `task_id` trains (method.gate_lr_scale applies to it): the one gate, or the
        task's own."""
        name = expert_name(task_id)
        gates = [
            layer.gate if layer.gate is not None else layer.task_gates[name]
            for layer in self.layers
            if layer.gate is not None or name in layer.task_gates
        ]
        return [p for gate in gates for p in gate.parameters()]

    def trainable_parameters(self, task_id: str) -> list[nn.Parameter]:
        """Exactly what a step on `task_id` may change; every other parameter gets requires_grad=False."""
        for p in self.parameters():
            p.requires_grad_(False)
        params = list(self.shared_parameters().values()) + list(self.task_parameters(task_id).values())
        for p in params:
            p.requires_grad_(True)
        return params

    # --- routing ----------------------------------------------------------------------------------------
    def _branches(self, sample_tasks: list[str], device: torch.device):
        for t in set(sample_tasks):
            self.task(t)
        routing = self.method.spec.routing
        shared = group_rows([self.shared_names] * len(sample_tasks), device)
        own = group_rows([(expert_name(t),) for t in sample_tasks], device)
        if routing == "gated":
            return [shared, own], True
        if routing == "shared":
            return [shared], False
        if routing == "own":
            return [own], False
        everything = tuple(expert_name(t) for t in self.task_ids)  # "sum"
        return [group_rows([everything] * len(sample_tasks), device)], False

    @contextmanager
    def routed(
        self,
        sample_tasks: list[str],
        *,
        attention_mask: torch.Tensor | None = None,
        collect_discriminator: bool = False,
        reverse_scale: float = 0.0,
        disabled: bool = False,
    ):
        """Route the forward passes inside the block: which experts each sample uses, and what to collect."""
        r = self.routing
        device = self.layers[0].base.down_proj.weight.device
        if disabled:
            r.branches, r.gated = [], False
        else:
            r.branches, r.gated = self._branches(sample_tasks, device)
        r.disabled = disabled
        r.token_mask = attention_mask
        r.collect_discriminator = collect_discriminator and self.has_discriminator
        r.reverse_scale = reverse_scale
        r.discriminator_logits = []
        try:
            yield r
        finally:
            r.branches, r.gated, r.disabled, r.token_mask = [], False, False, None
            r.collect_discriminator, r.discriminator_logits = False, []

    # --- forward ----------------------------------------------------------------------------------------
    @staticmethod
    def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
        """Inputs are left-padded; positions count real tokens only."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def decoder_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states of the decoder (no LM head). Call inside `routed(...)`."""
        decoder = getattr(self.base_model, self.base_model.base_model_prefix)
        out = decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=self.position_ids(attention_mask),
            use_cache=False,
        )
        return out.last_hidden_state

    def classify(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_id: str | list[str]
    ) -> torch.Tensor:
        """Head logits on the last token (the last non-pad token, since inputs are left-padded).

        `task_id`: one task for every row, or each row's task (rows of several tasks, e.g. replayed ones). Heads
        differ in width: mixed rows get [B, widest] logits, padded with -1e9 past their own head's labels."""
        last = self.decoder_hidden(input_ids, attention_mask)[:, -1, :]
        tasks = [task_id] * last.shape[0] if isinstance(task_id, str) else list(task_id)
        if len(set(tasks)) == 1:
            head = self.heads[tasks[0]]
            return head(last.to(head.weight.dtype))
        width = max(self.heads[t].out_features for t in tasks)
        logits = None
        for t in sorted(set(tasks)):
            rows = torch.tensor([i for i, r in enumerate(tasks) if r == t], device=last.device)
            head = self.heads[t]
            part = head(last.index_select(0, rows).to(head.weight.dtype))
            part = torch.nn.functional.pad(part, (0, width - part.shape[1]), value=-1e9)
            logits = part.new_zeros(len(tasks), width) if logits is None else logits
            logits = logits.index_copy(0, rows, part)
        return logits

    def lm_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int = 0
    ) -> torch.Tensor:
        """LM logits of every position, or of the last `keep_last` positions only (the base model's own
        `logits_to_keep` where its forward takes one, else computed in full and sliced)."""
        extra = {}
        if keep_last and self._takes_logits_to_keep:
            extra["logits_to_keep"] = keep_last
        out = self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=self.position_ids(attention_mask),
            use_cache=False,
            **extra,
        )
        logits = out.logits
        if keep_last and logits.shape[1] > keep_last:
            logits = logits[:, -keep_last:]
        return logits

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        task_id: str | list[str] | None = None,
        output: str = "classify",
        keep_last: int = 0,
    ) -> MoECLOutput:
        """One forward pass, for training under a wrapper such as DDP. Call inside `routed(...)`.

        output="classify": the head logits of `task_id` (`classify`); output="lm": the LM logits (`lm_logits`,
        of the last `keep_last` positions when it is not 0).
        The discriminator logits the routing collected are returned too, so that a wrapper which looks for the
        parameters a pass used (DDP with find_unused_parameters) finds the discriminators as well.
        """
        if output == "classify":
            if task_id is None:
                raise MoeclError("forward(output='classify') needs a task_id")
            logits = self.classify(input_ids, attention_mask, task_id)
        elif output == "lm":
            logits = self.lm_logits(input_ids, attention_mask, keep_last)
        else:
            raise MoeclError(f"forward: output={output!r} is not 'classify' or 'lm'")
        return MoECLOutput(logits, tuple(self.routing.discriminator_logits))
