"""Benchmark presets: plain data in bench/presets.yaml (what each one holds is described there).

CLI flags (--methods, --modes, --orders, --seeds) select from a preset; --per-class, --test-per-task, --epochs
and --max-length resize it (`resized`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

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
