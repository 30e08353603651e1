"""One result file per finished run, so that a benchmark resumes where it stopped.

bench/results/runs/<preset>[-dev]/<row>.<mode>.<order>.s<seed>.json holds one run (the dict bench.runs returns)
and the key of everything that decides its outcome: the run's Params, the task order, the sampled data's
content hashes, the backbone's sha256 and STORE_VERSION. A rerun reuses a file whose key matches and runs the
others; the results files aggregate whatever runs are there. Bump STORE_VERSION when a code change alters what
a run computes, so that stored runs are not mistaken for current ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from moecl.config import PAPER_SETTING
from moecl.io import write_json_atomic

STORE_VERSION = 2


def run_key(
    params_dict: dict, order: list[str], data_hashes: dict[str, str], base_sha256: str, device: str = "cpu"
) -> str:
    fixed = {k: v for k, v in params_dict.items() if k not in ("registry", "flow", "bench", "drift", "gate")}
    fixed["model"] = {k: v for k, v in (fixed.get("model") or {}).items() if k != "local_dir"}
    # method knobs at the paper's value are left out, so that a knob added later (at the paper's value by
    # default) keeps the keys of the runs stored before it
    fixed["method"] = {
        k: v
        for k, v in (fixed.get("method") or {}).items()
        if not (k in PAPER_SETTING and v == PAPER_SETTING[k]) and k != "paper"
    }
    payload = {
        "version": STORE_VERSION,
        "params": fixed,
        "order": list(order),
        "data": dict(sorted(data_hashes.items())),
        "base": base_sha256,
    }
    if device != "cpu":  # (cpu runs stored before the device was part of the key keep their key)
        payload["device"] = device
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def run_path(runs_dir: Path, stem: str, mode: str, order: str, seed: int) -> Path:
    return Path(runs_dir) / f"{stem}.{mode}.{order}.s{seed}.json"


def load_run(path: Path, key: str) -> dict | None:
    """The stored run at `path` if its key is `key` (same settings), else None."""
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return stored.get("run") if stored.get("key") == key else None


def save_run(path: Path, key: str, run: dict, context: dict) -> None:
    write_json_atomic(path, {"key": key, "context": context, "run": run})
