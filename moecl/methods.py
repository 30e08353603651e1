"""One home per continual-learning method: which experts it has, how a sample is routed, what it trains.

Everything else (config validation, the model's routing, the loss terms, the benchmark) reads this table
instead of testing method names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    name: str
    shared: bool  # one shared expert, trained by every task's step
    dedicated: bool  # one expert per task, frozen once its task is learned
    routing: (
        str  # "gated": shared + own mixed by the gate; "shared"; "own"; "sum": every task's expert summed
    )
    adversarial: bool  # task discriminators behind a gradient-reversal layer on the shared expert
    orthogonal_experts: bool  # O-LoRA: a new expert's A kept orthogonal to the earlier experts' A
    summary: str

    @property
    def gated(self) -> bool:
        return self.routing == "gated"


METHOD_SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "moecl", True, True, "gated", True, False, "MoE-CL: shared + dedicated experts, gate, GAN"
        ),
        MethodSpec("moecl_nogan", True, True, "gated", False, False, "MoE-CL without the adversarial term"),
        MethodSpec("seq_lora", True, False, "shared", False, False, "one LoRA trained on every task in turn"),
        MethodSpec("per_task_lora", False, True, "own", False, False, "one isolated LoRA per task"),
        MethodSpec("o_lora", False, True, "sum", False, True, "O-LoRA: orthogonal per-task LoRAs, summed"),
    )
}
METHODS = tuple(METHOD_SPECS)


def method_spec(name: str) -> MethodSpec:
    return METHOD_SPECS[name]
