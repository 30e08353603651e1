"""One result file per finished run, so that a benchmark resumes where it stopped.

bench/results/runs/<preset>[-dev]/<row>.<mode>.<order>.s<seed>.json holds one run (what bench.runs returns) and
the key of everything that decides its outcome: the run's Params, the task order, the data's content hashes, the
backbone's sha256 and STORE_VERSION (bump it when a code change alters what a run computes).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from moecl.config import PAPER_SETTING
from moecl.io import write_json_atomic

STORE_VERSION = 2


def run_key(params: dict, order: list[str], data_hashes: dict, base_sha256: str, device="cpu") -> str:
    fixed = {k: v for k, v in params.items() if k not in ("registry", "flow", "bench", "drift", "gate")}
    fixed["model"] = {k: v for k, v in (fixed.get("model") or {}).items() if k != "local_dir"}
    # how memory is managed changes no result (moecl.train.allocator)
    fixed["train"] = {k: v for k, v in (fixed.get("train") or {}).items() if k != "keep_freed_memory"}
    # knobs at the paper's value are left out: a knob added later (at that value by default) keeps the old keys
    method = (fixed.get("method") or {}).items()
    fixed["method"] = {
        k: v for k, v in method if k != "paper" and not (k in PAPER_SETTING and v == PAPER_SETTING[k])
    }
    payload = {"version": STORE_VERSION, "params": fixed, "order": list(order), "base": base_sha256}
    payload["data"] = dict(sorted(data_hashes.items()))
    if device != "cpu":  # (cpu runs stored before the device was part of the key keep their key)
        payload["device"] = device
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def run_path(runs_dir: Path, stem: str, mode: str, order: str, seed: int) -> Path:
    return Path(runs_dir) / f"{stem}.{mode}.{order}.s{seed}.json"


def load_run(path: Path, key: str) -> dict | None:
    """The stored run at `path` if its key is `key` (same settings), else None."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return stored.get("run") if stored.get("key") == key else None


def save_run(path: Path, key: str, run: dict, context: dict) -> None:
    write_json_atomic(path, {"key": key, "context": context, "run": run})
