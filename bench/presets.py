"""Benchmark presets, as plain data: which backbone, data, orders, rows and sizes a run uses.

A preset's `params` and each mode's Params sections (`train`, `evaluate`, ...) are moecl Params overrides,
laid over COMMON and the library's defaults by bench.params.method_params; the rest is the bench's own:
`per_class` / `test_per_task` (the data sample), `cost` (bench/cost.py), the rows and seeds. CLI flags
(--methods, --modes, --orders, --seeds) select; --per-class, --test-per-task, --epochs, --max-length resize.
"""

from __future__ import annotations

import copy

# The main table: the baselines, MoE-CL as published and at the library's defaults, the joint upper bound,
# and replay for every method it can help (per_task_lora's replayed rows would only pass frozen experts).
METHODS = "seq_lora per_task_lora o_lora moecl_paper moecl mtl seq_lora+replay o_lora+replay moecl+replay"
METHODS = tuple(METHODS.split())
# One row per knob beyond the paper, each added alone to the paper's setting (`--ablation`).
ABLATION = tuple(
    "moecl_paper moecl_nogan moecl_paper+shared_lr moecl_paper+gate_bias moecl_paper+task_gates "
    "moecl_paper+warm moecl_paper+orth moecl_paper+memory moecl_paper+replay moecl".split()
)
# The paper's task orders on the 4-task standard CL benchmark (MTL5 without yelp).
MTL5_ORDERS = {
    "order1": ["dbpedia", "amazon", "yahoo", "agnews"],
    "order2": ["dbpedia", "amazon", "agnews", "yahoo"],
    "order3": ["yahoo", "amazon", "agnews", "dbpedia"],
}
# Synthetic tasks of moecl.testing for the smoke preset.
SYNTHETIC_TASKS = {
    "topic": ["sports", "business", "science", "politics"],
    "sentiment": ["positive", "negative"],
    "spam": ["spam", "ham"],
}
SYNTHETIC_ORDERS = {"order1": ["topic", "sentiment", "spam"], "order2": ["spam", "sentiment", "topic"]}

# Params overrides every preset shares: a float32 base, one dev check per epoch, every sampled record used,
# greedy answers, FWT measured.
COMMON = {
    "model": {"dtype": "float32"},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
    "method": {"adv_alpha": 0.1},
    "train": {"dev_fraction": 0.1, "evals_per_epoch": 1, "max_train_examples": 0, "threads": 0},
    "evaluate": {"instruction_eval": "generate", "max_new_tokens": 8, "batch_size": 16},
}
COMMON["evaluate"].update(max_test_examples=0, fwt=True)
# What a preset holds unless it says otherwise (the bench's own choices).
DEFAULTS = {
    "methods": METHODS,
    "ablation": ABLATION,
    "extra_seeds": {},  # row -> training seeds beyond `seed` (training-seed noise; the data keeps `seed`)
    "replay_per_task": 16,  # the `replay` knob: training records replayed per earlier task
    "device": "cpu",
    "seed": 42,
    "params": {},
}
# The cost figures (bench/cost.py): `tasks` already in the model when a step is timed (the last one trains).
COST = {"tasks": 4, "modes": ["classifier"], "scaling_tasks": [1, 4, 16, 64], "scaling_methods": ["moecl"]}


def _mode(
    per_class: int, test_per_task: int, epochs: int, lr: float, batch: int, max_length: int, **evaluate
):
    train = {"epochs": epochs, "lr": lr, "batch_size": batch, "max_length": max_length}
    return {"per_class": per_class, "test_per_task": test_per_task, "train": train, "evaluate": evaluate}


# 16 examples/class, 2 epochs, 100 test records per task, prompts cut at 128 tokens: ~120 steps of 8 x 128
# tokens and ~1400 greedy generations a run, ~11 minutes on 2 cores; the smallest size at which the joint
# upper bound beats seq_lora by more than 3 paired standard errors.
_CPU_INSTRUCTION = _mode(16, 100, 2, 5e-4, 8, 128)
_SECOND_SEED = {m: (43,) for m in ("seq_lora", "moecl_paper", "moecl", "moecl+replay")}
# Both modes' cost figures, and how o_lora's step grows with the task count beside moecl's.
_COST_BOTH = {"modes": ["classifier", "instruction"], "scaling_methods": ["moecl", "o_lora"]}
_MTL5 = {"backbone": "params", "data": "mtl5", "params": {"train": {"threads": 2}}}

PRESETS = {
    "smoke": {
        "description": "tiny random Llama (moecl.testing), synthetic tasks: every code path in seconds",
        "backbone": "tiny",
        "data": "synthetic",
        "orders": SYNTHETIC_ORDERS,
        "params": {"train": {"threads": 1}},
        "modes": {m: _mode(6, 8, 2, 5e-3, 8, 48, max_new_tokens=4) for m in ("classifier", "instruction")},
        "cost": {"batch_size": 4, "seq_len": 32, "warmup": 1, "repeats": 2, **_COST_BOTH},
        "methods": tuple(
            "seq_lora per_task_lora o_lora moecl_nogan moecl_paper moecl moecl_mem mtl seq_lora+replay "
            "moecl+replay".split()
        ),
        "replay_per_task": 4,
    },
    "cpu": {
        **_MTL5,
        "description": "SmolLM2-135M-Instruct on 2 CPU cores, instruction mode, order1 (a second seed for the "
        "rows that carry the comparison); about 11 minutes a run, resumable run by run",
        "orders": {"order1": MTL5_ORDERS["order1"]},
        "modes": {"instruction": _CPU_INSTRUCTION},
        "cost": {"batch_size": 8, "seq_len": 128, "warmup": 1, "repeats": 3},
        "extra_seeds": _SECOND_SEED,
    },
    "cpu-full": {
        **_MTL5,
        "description": "SmolLM2-135M-Instruct on CPU, instruction mode, all three orders (about 5 hours)",
        "orders": MTL5_ORDERS,
        "modes": {"instruction": _CPU_INSTRUCTION},
        "cost": {"batch_size": 8, "seq_len": 128, "warmup": 1, "repeats": 5},
    },
    # The cpu preset's first sizes: at them the methods could not be told apart (bench/results/cpu-small.md).
    "cpu-small": {
        **_MTL5,
        "description": "the cpu preset's first size: 6/class, 24 test records, both modes (under an hour); "
        "too small to tell the methods apart",
        "orders": {"order1": MTL5_ORDERS["order1"]},
        "modes": {"instruction": _mode(6, 24, 2, 5e-4, 8, 112), "classifier": _mode(4, 24, 1, 1e-3, 8, 64)},
        "cost": {"batch_size": 8, "seq_len": 128, "warmup": 1, "repeats": 3},
    },
    # Sized for the calibration the CPU cannot reach: there per_task_lora scored 0.28 on amazon at 16/class and
    # 0.32 at 32 (twice chance is 0.40; bench/results/calibration-*), so instruction mode trains on 64/class.
    # bench/gpu_run.sh adds a time budget (--budget-minutes; runs go order by order).
    "gpu": {
        "description": "SmolLM2-135M-Instruct, bf16 base on one CUDA GPU, all three orders, both modes",
        "backbone": "params",
        "data": "mtl5",
        "orders": MTL5_ORDERS,
        "params": {"model": {"dtype": "bfloat16"}},
        "modes": {
            "instruction": _mode(64, 100, 2, 5e-4, 16, 160, batch_size=100),
            "classifier": _mode(16, 200, 2, 1e-3, 16, 160, batch_size=200),
        },
        "cost": {"batch_size": 16, "seq_len": 160, "warmup": 3, "repeats": 10, **_COST_BOTH},
        "extra_seeds": _SECOND_SEED,
        "replay_per_task": 64,
        "device": "cuda",
    },
}


def get_preset(name: str) -> dict:
    """The preset with its defaults filled in (a copy: the caller may change it)."""
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    preset = {"name": name, **copy.deepcopy(DEFAULTS), **copy.deepcopy(PRESETS[name])}
    preset["cost"] = {**COST, **preset["cost"]}
    return preset


def resized(preset: dict, **sizes) -> dict:
    """The preset with `sizes` changed in every mode (CLI flags; None: unchanged): per_class and test_per_task
    (the data sample), epochs and max_length (Params train)."""
    for mode in preset["modes"].values():
        for key, value in sizes.items():
            if value is not None:
                (mode if key in ("per_class", "test_per_task") else mode["train"])[key] = value
    return preset
