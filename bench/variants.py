"""The benchmark's rows ("variants"): a library method plus method-knob overrides, named by what they add.

A variant name is a base, optionally followed by knobs: `moecl_paper+gate_bias+task_gates`,
`seq_lora+replay`, `moecl_paper+shared_lr=0.1`. Bases:
  seq_lora, per_task_lora, o_lora, moecl_nogan  the library's baselines, at the paper's setting
  moecl_paper                                   MoE-CL exactly as published (method.paper: true)
  moecl                                         MoE-CL with the library's defaults (params.yaml: the best measured)
  moecl_mem                                     moecl_paper with the discriminator memory
  mtl                                           the joint multi-task upper bound (bench/joint.py)
A knob sets method params (its value from KNOBS, or `knob=value` for the first of them); knobs apply to
any base that has what they change, so `o_lora+replay` and `moecl+replay` are fair pairs.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from moecl.config import PAPER_SETTING, MethodConfig

BASES = {  # base -> (library method.name, overrides on the library's default MethodConfig)
    "seq_lora": ("seq_lora", dict(PAPER_SETTING)),
    "per_task_lora": ("per_task_lora", dict(PAPER_SETTING)),
    "o_lora": ("o_lora", dict(PAPER_SETTING)),
    "moecl_nogan": ("moecl_nogan", dict(PAPER_SETTING)),
    "moecl_paper": ("moecl", {"paper": True, **PAPER_SETTING}),
    "moecl_mem": ("moecl", {**PAPER_SETTING, "memory_per_task": 8}),
    "moecl": ("moecl", {}),
    "mtl": ("seq_lora", dict(PAPER_SETTING)),  # one shared LoRA trained on every task at once
}

# knob -> the method params it sets (the first key takes `knob=value`). Values chosen on the dev split
# (bench/results/cpu-dev.md); `replay_per_task` is the preset's (Preset.replay_per_task) unless given.
KNOBS = {
    "shared_lr": {"shared_lr_scale": 0.25},
    "gate_bias": {"gate_bias": 1.25},
    "task_gates": {"task_gates": True},
    "orth": {"shared_orthogonal": True},
    "memory": {"memory_per_task": 8, "discriminator_span": "prompt"},
    "prompt_pool": {"discriminator_span": "prompt"},
    "replay": {"replay_per_task": None},
    "warm": {"dedicated_init": "shared"},
    "nogan": {"adv_alpha": 0.0},
}

LABELS = {"moecl_paper": "moecl (paper)", "moecl": "moecl (best)"}


@dataclass(frozen=True)
class Variant:
    name: str
    base: str
    method: str  # the library's method.name
    overrides: dict  # MethodConfig field -> value

    @property
    def joint(self) -> bool:
        return self.base == "mtl"

    @property
    def label(self) -> str:
        head = LABELS.get(self.base, self.base)
        rest = self.name[len(self.base) :]
        return head + rest

    @property
    def file_stem(self) -> str:
        """A file-name-safe form of the name."""
        return re.sub(r"[^A-Za-z0-9_.-]", lambda m: {"+": ".", "=": "-"}.get(m.group(), "_"), self.name)

    def method_config(self, defaults: MethodConfig, replay_per_task: int) -> MethodConfig:
        fields = {f.name for f in dataclasses.fields(MethodConfig)}
        values = {k: v for k, v in self.overrides.items() if k in fields}
        if values.get("replay_per_task", 0) is None:
            values["replay_per_task"] = replay_per_task
        values["paper"] = bool(values.get("paper", False))
        return dataclasses.replace(defaults, name=self.method, **values)


def parse_variant(name: str) -> Variant:
    """`base[+knob[=value]]...` -> Variant; an unknown base or knob is a SystemExit naming the choices."""
    base, *knobs = name.split("+")
    if base not in BASES:
        raise SystemExit(f"unknown method {base!r} in {name!r}: bases are {', '.join(BASES)}")
    method, overrides = BASES[base]
    overrides = dict(overrides)
    for knob in knobs:
        key, _, value = knob.partition("=")
        if key not in KNOBS:
            raise SystemExit(f"unknown knob {key!r} in {name!r}: knobs are {', '.join(KNOBS)}")
        if base == "moecl_paper":
            overrides["paper"] = False  # the paper plus this knob
        settings = dict(KNOBS[key])
        if value:
            first = next(iter(settings))
            settings[first] = _typed(value, getattr(MethodConfig(), first))
        overrides.update(settings)
    return Variant(name, base, method, overrides)


def _typed(value: str, like):
    if isinstance(like, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(like, int):
        return int(value)
    if isinstance(like, float):
        return float(value)
    return value
