"""The benchmark's presets (plain data in bench/presets.yaml), its rows ("variants"), and the moecl Params of each
row: the presets' overrides on the library's defaults. CLI flags select from a preset or resize it (`resized`).

A variant name is a base, optionally followed by knobs: `moecl_paper+gate_bias+task_gates`, `seq_lora+replay`,
`moecl_paper+shared_lr=0.1`. Bases:
  seq_lora, per_task_lora, o_lora, moecl_nogan  the library's baselines, at the paper's setting
  moecl_paper                                   MoE-CL exactly as published (method.paper: true)
  moecl                                         MoE-CL with the library's defaults but no replay (`moecl+replay`: the
                                                defaults, params.yaml: the best measured)
  moecl_mem                                     moecl_paper with the discriminator memory
  mtl                                           the joint multi-task upper bound (bench/runs.py)
A knob sets method params (its value from KNOBS, or `knob=value` for the first of them); knobs apply to any
base that has what they change, so `o_lora+replay` and `moecl+replay` are fair pairs.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import yaml

from moecl.config import PAPER_SETTING, ModelConfig, Params, load_params, params_from_dict

_FILE = yaml.safe_load((Path(__file__).resolve().parent / "presets.yaml").read_text(encoding="utf-8"))
COMMON, DEFAULTS, PRESETS = _FILE["common"], _FILE["defaults"], _FILE["presets"]
METHODS, SYNTHETIC_TASKS = tuple(DEFAULTS["methods"]), _FILE["synthetic_tasks"]


def get_preset(name: str) -> dict:
    """The preset with its defaults filled in (a copy: the caller may change it)."""
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    preset = {"name": name, **copy.deepcopy(DEFAULTS), **copy.deepcopy(PRESETS[name])}
    preset["cost"] = {**DEFAULTS["cost"], **preset["cost"]}
    return preset


def resized(preset: dict, **sizes) -> dict:
    """The preset with `sizes` changed in every mode (CLI flags; None: unchanged): per_class and test_per_task
    (the data sample), epochs and max_length (Params train)."""
    for mode in preset["modes"].values():
        for key, value in sizes.items():
            if value is not None:
                (mode if key in ("per_class", "test_per_task") else mode["train"])[key] = value
    return preset


BASES = {b: {"name": b, **PAPER_SETTING} for b in ("seq_lora", "per_task_lora", "o_lora", "moecl_nogan")}
BASES |= {  # base -> method params over the library's defaults
    "moecl_paper": {"name": "moecl", "paper": True, **PAPER_SETTING},
    "moecl_mem": {"name": "moecl", **PAPER_SETTING, "memory_per_task": 8},
    # the defaults without replay (their stored runs keep their keys); `moecl+replay`: the defaults
    "moecl": {"name": "moecl", "replay_per_task": 0},
    "mtl": {"name": "seq_lora", **PAPER_SETTING},  # one shared LoRA trained on every task at once
}
# knob -> the method params it sets (the first takes `knob=value`). Values chosen on the dev split
# (bench/results/cpu-dev.md); `replay_per_task` None: the preset's `replay_per_task`.
KNOBS = {
    "shared_lr": {"shared_lr_scale": 0.25},
    "gate_lr": {"gate_lr_scale": 20.0},
    "gate_bias": {"gate_bias": 1.25},
    "task_gates": {"task_gates": True},
    "orth": {"shared_orthogonal": True},
    "memory": {"memory_per_task": 8, "discriminator_span": "prompt"},
    "prompt_pool": {"discriminator_span": "prompt"},
    "replay": {"replay_per_task": None},
    "warm": {"dedicated_init": "shared"},
    # with per_task_lora: each task's LoRA starts as the previous task's, then is frozen (seq_lora's path, kept)
    "from_previous": {"dedicated_init": "previous"},
    "nogan": {"adv_alpha": 0.0},
    "adv": {"adv_alpha": 1.0},  # the reference code's adversarial weight (the paper's: 0.1, the defaults')
}
# how the tables name a row (a whole name first, then its base)
LABELS = {"moecl_paper": "moecl (paper)", "moecl": "moecl (no replay)", "moecl+replay": "moecl (best)"}


def parse_variant(name: str) -> dict:
    """`base[+knob[=value]]...` -> its method params; an unknown base or knob: a SystemExit naming the choices."""
    base, *knobs = name.split("+")
    if base not in BASES:
        raise SystemExit(f"unknown method {base!r} in {name!r}: bases are {', '.join(BASES)}")
    method = {"paper": False, **BASES[base]}
    for knob in knobs:
        key, _, value = knob.partition("=")
        if key not in KNOBS:
            raise SystemExit(f"unknown knob {key!r} in {name!r}: knobs are {', '.join(KNOBS)}")
        method |= KNOBS[key] | {"paper": False}  # moecl_paper+knob: the paper plus this knob
        if value:  # a string: params_from_dict coerces it to the field's type
            method[next(iter(KNOBS[key]))] = value
    return method


def is_joint(name: str) -> bool:
    return name.split("+")[0] == "mtl"


def label(name: str) -> str:
    """How the tables name a row: `moecl (paper)`, `moecl (best)`, `moecl (best)+memory` (moecl+replay+memory),
    `moecl (no replay)+shared_lr`, `seq_lora`...: the longest labelled head of the name, then the rest."""
    heads = [k for k in LABELS if name == k or name.startswith(k + "+")]
    head = max(heads, key=len, default="")
    return LABELS[head] + name[len(head) :] if head else name


def file_stem(name: str) -> str:
    """A file-name-safe form of a row's name (`+` -> `.`, `=` -> `-`)."""
    return re.sub(r"[^A-Za-z0-9_.-]", lambda m: {"+": ".", "=": "-"}.get(m.group(), "_"), name)


def model_config(preset: dict, params_file: str | Path = "params.yaml", base_dir=None) -> ModelConfig:
    """The project's `model:` section (where the backbone comes from) under the preset's model overrides."""
    cfg = load_params(params_file).model if Path(params_file).is_file() else ModelConfig()
    for key, value in {**COMMON["model"], **preset["params"].get("model", {})}.items():
        setattr(cfg, key, value)
    if base_dir:
        cfg.name_or_path = str(base_dir)
    return cfg


def method_params(preset: dict, method: str, mode: str, model_cfg=None, seed: int | None = None) -> Params:
    """Params of one row in one mode: the library's defaults under COMMON, the preset's, the mode's and the
    variant's overrides; `seed`: the training seed (default the preset's; the data sample always uses it)."""
    # a mode the preset does not train (the cost figures' classifier mode on the instruction-only cpu preset)
    # takes the preset's and the library's settings
    sections = {k: v for k, v in preset["modes"].get(mode, {}).items() if isinstance(v, dict)}
    variant = parse_variant(method)
    if variant.get("replay_per_task", 0) is None:
        variant["replay_per_task"] = preset["replay_per_task"]
    raw: dict = {}
    for layer in (COMMON, preset["params"], sections, {"method": variant}):
        for section, values in layer.items():
            raw.setdefault(section, {}).update(values)
    raw["method"]["mode"] = mode
    raw["train"]["seed"] = preset["seed"] if seed is None else seed
    if model_cfg is not None:
        raw["model"] = dataclasses.asdict(model_cfg)
    return params_from_dict(raw, f"bench preset {preset['name']}")
