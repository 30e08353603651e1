"""Benchmark presets: which backbone, data, methods, orders and sizes a run uses.

A preset is plain data; `bench.run` turns it into moecl Params (one per row and mode: bench.params) and runs
it. Its rows ("methods") are variant names (bench.variants): a library method plus method-knob overrides.
CLI flags (--methods, --modes, --orders, --seeds) select; --per-class, --test-per-task, --epochs, --max-length
resize.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# The rows of the main table: the baselines, MoE-CL as published and at the library's defaults, the joint
# upper bound, and replay offered to every method that can use it (per_task_lora's replayed rows would only
# pass through frozen experts).
METHODS = (
    "seq_lora",
    "per_task_lora",
    "o_lora",
    "moecl_paper",
    "moecl",
    "mtl",
    "seq_lora+replay",
    "o_lora+replay",
    "moecl+replay",
)
# One row per knob beyond the paper, each added alone to the paper's setting (`--ablation`).
ABLATION = (
    "moecl_paper",
    "moecl_nogan",
    "moecl_paper+shared_lr",
    "moecl_paper+gate_bias",
    "moecl_paper+task_gates",
    "moecl_paper+warm",
    "moecl_paper+orth",
    "moecl_paper+memory",
    "moecl_paper+replay",
    "moecl",
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
SYNTHETIC_ORDERS = {
    "order1": ["topic", "sentiment", "spam"],
    "order2": ["spam", "sentiment", "topic"],
}


@dataclass(frozen=True)
class ModeSize:
    """Data and training sizes of one mode (classifier heads or instruction tuning)."""

    per_class: int  # training examples sampled per class (the dev split is carved from them)
    test_per_task: int  # stratified test sample per task
    epochs: int
    lr: float
    batch_size: int
    max_length: int
    evals_per_epoch: int = 1
    dev_fraction: float = 0.1
    max_new_tokens: int = 8
    eval_batch_size: int = 16


@dataclass(frozen=True)
class CostSize:
    """The timing micro-benchmarks (bench/cost.py)."""

    batch_size: int
    seq_len: int
    warmup: int
    repeats: int
    tasks: int = 4  # tasks already in the model when a method's step is timed (the last one trains)
    modes: tuple[str, ...] = ("classifier",)
    scaling_tasks: tuple[int, ...] = (1, 4, 16, 64)
    scaling_methods: tuple[str, ...] = ("moecl",)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    backbone: str  # "tiny": moecl.testing's in-process Llama; "params": the real backbone (params `model:`)
    data: str  # "synthetic" | "mtl5"
    orders: dict[str, list[str]]
    modes: dict[str, ModeSize]
    cost: CostSize
    methods: tuple[str, ...] = METHODS
    ablation: tuple[str, ...] = ABLATION
    # training seeds beyond `seed` for some rows (training-seed noise; the data sample keeps `seed`)
    extra_seeds: dict = field(default_factory=dict)
    replay_per_task: int = 16  # the `replay` knob: training records replayed per earlier task
    dtype: str = "float32"  # the frozen base's dtype (adapters stay float32)
    device: str = "cpu"
    threads: int = 0  # torch CPU threads (0 = torch's default)
    adv_alpha: float = 0.1
    seed: int = 42
    lora: dict = field(default_factory=lambda: {"r": 8, "alpha": 16, "dropout": 0.05})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_SMOKE_MODE = ModeSize(
    per_class=6, test_per_task=8, epochs=2, lr=5e-3, batch_size=8, max_length=48, max_new_tokens=4
)

_CPU_INSTRUCTION = ModeSize(
    # 16 examples/class, 2 epochs, 100 test records per task, prompts cut at 128 tokens: about 120 steps of
    # 8 x 128 tokens and ~1400 greedy generations per run, ~11 minutes per run on 2 cores. The smallest size
    # at which the joint upper bound beats seq_lora by more than 3 paired standard errors.
    per_class=16,
    test_per_task=100,
    epochs=2,
    lr=5e-4,
    batch_size=8,
    max_length=128,
)
# The first sizes of the cpu preset (6/class, 24 test records, both modes): kept as `cpu-small`; at that
# size the methods could not be told apart (bench/results/cpu-small.md).
_CPU_SMALL_MODES = {
    "instruction": ModeSize(per_class=6, test_per_task=24, epochs=2, lr=5e-4, batch_size=8, max_length=112),
    "classifier": ModeSize(per_class=4, test_per_task=24, epochs=1, lr=1e-3, batch_size=8, max_length=64),
}
# Training-seed noise: the rows that carry the comparison also run with a second seed.
_SECOND_SEED = {m: (43,) for m in ("seq_lora", "moecl_paper", "moecl", "moecl+replay")}

PRESETS = {
    "smoke": Preset(
        name="smoke",
        description="tiny random Llama (moecl.testing), synthetic tasks: every code path in seconds",
        backbone="tiny",
        data="synthetic",
        orders=SYNTHETIC_ORDERS,
        modes={"classifier": _SMOKE_MODE, "instruction": _SMOKE_MODE},
        cost=CostSize(
            batch_size=4,
            seq_len=32,
            warmup=1,
            repeats=2,
            modes=("classifier", "instruction"),
            scaling_methods=("moecl", "o_lora"),
        ),
        methods=(
            "seq_lora",
            "per_task_lora",
            "o_lora",
            "moecl_nogan",
            "moecl_paper",
            "moecl",
            "moecl_mem",
            "mtl",
            "seq_lora+replay",
            "moecl+replay",
        ),
        replay_per_task=4,
        threads=1,
    ),
    "cpu": Preset(
        name="cpu",
        description="SmolLM2-135M-Instruct on 2 CPU cores, instruction mode, order1 (a second seed for the "
        "rows that carry the comparison); about 11 minutes a run, resumable run by run",
        backbone="params",
        data="mtl5",
        orders={"order1": MTL5_ORDERS["order1"]},
        modes={"instruction": _CPU_INSTRUCTION},
        cost=CostSize(batch_size=8, seq_len=128, warmup=1, repeats=3),
        extra_seeds=_SECOND_SEED,
        threads=2,
    ),
    "cpu-full": Preset(
        name="cpu-full",
        description="SmolLM2-135M-Instruct on CPU, instruction mode, all three orders (about 5 hours)",
        backbone="params",
        data="mtl5",
        orders=MTL5_ORDERS,
        modes={"instruction": _CPU_INSTRUCTION},
        cost=CostSize(batch_size=8, seq_len=128, warmup=1, repeats=5),
        threads=2,
    ),
    "cpu-small": Preset(
        name="cpu-small",
        description="the cpu preset's first size: 6/class, 24 test records, both modes (under an hour); "
        "too small to tell the methods apart",
        backbone="params",
        data="mtl5",
        orders={"order1": MTL5_ORDERS["order1"]},
        modes=_CPU_SMALL_MODES,
        cost=CostSize(batch_size=8, seq_len=128, warmup=1, repeats=3),
        threads=2,
    ),
    "gpu": Preset(
        name="gpu",
        description="SmolLM2-135M-Instruct, bf16 base on one CUDA GPU, all three orders, both modes",
        backbone="params",
        data="mtl5",
        orders=MTL5_ORDERS,
        modes={
            # Sized for the calibration the CPU preset cannot reach: on CPU, per_task_lora on amazon scored
            # 0.28 at 16 examples/class and 0.32 at 32 (twice chance is 0.40; bench/results/calibration-*),
            # so instruction mode trains on 64/class; 100 test records per task, every order. bench/gpu_run.sh
            # adds a time budget (--budget-minutes; runs go order by order) so the script stays under 8 minutes.
            "instruction": ModeSize(
                per_class=64,
                test_per_task=100,
                epochs=2,
                lr=5e-4,
                batch_size=16,
                max_length=160,
                eval_batch_size=100,
            ),
            "classifier": ModeSize(
                per_class=16,
                test_per_task=200,
                epochs=2,
                lr=1e-3,
                batch_size=16,
                max_length=160,
                eval_batch_size=200,
            ),
        },
        cost=CostSize(
            batch_size=16,
            seq_len=160,
            warmup=3,
            repeats=10,
            modes=("classifier", "instruction"),
            scaling_methods=("moecl", "o_lora"),
        ),
        extra_seeds=_SECOND_SEED,
        replay_per_task=64,
        dtype="bfloat16",
        device="cuda",
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def resized(preset: Preset, **changes) -> Preset:
    """A preset with some ModeSize fields changed in every mode (CLI flags such as --per-class)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        return preset
    modes = {mode: dataclasses.replace(size, **changes) for mode, size in preset.modes.items()}
    return dataclasses.replace(preset, modes=modes)
