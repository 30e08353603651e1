"""One benchmark run, through the library's own step, training loop and evaluation, and its own result file, so
that a benchmark resumes where it stopped.

bench/results/runs/<preset>[-dev]/<row>.<mode>.<order>.s<seed>.json holds one run (what `run_one` returns) and
the key of everything that decides its outcome: the run's Params, the task order, the data's content hashes, the
backbone's sha256 and STORE_VERSION (bump it when a code change alters what a run computes).

A continual run (row x mode x order) is one `run_step` per task from the previous bank; each new bank is
evaluated with `evaluate_bank` on only the cells the metrics read: the task just learned (R[i][i]) after each
step, every task after the last step. The step itself scores R[i-1][i] and b_i for FWT. The joint upper bound
(`mtl`) fits one shared LoRA on every task's rows at once with the library's loop (moecl.train.loop.fit).
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.params import file_stem, is_joint, method_params
from moecl.bank import new_model
from moecl.config import PAPER_SETTING
from moecl.evaluate import evaluate_bank, evaluate_model
from moecl.io import write_json_atomic
from moecl.metrics import ContinualMetrics
from moecl.model.moecl_model import TaskInfo
from moecl.routing import bank_routing
from moecl.train.loop import fit, task_items
from moecl.train.step import run_step, seed_everything

STORE_VERSION = 2


@dataclass
class Bench:
    """What the runs of one invocation share."""

    preset: dict
    base: object  # moecl.model.base.BaseSpec
    model_cfg: object = None  # the real backbone's moecl ModelConfig (None: the tiny one)
    tasks: dict = field(default_factory=dict)  # mode -> task id -> TaskData
    orders: dict = field(default_factory=dict)  # order name -> its task ids
    workdir: Path = Path(".")  # where the runs' banks go
    keep_banks: bool = False
    progress: bool = False
    zero_shot: dict = field(default_factory=dict)  # task -> b_i in instruction mode (see run_continual)


def run_one(bench: Bench, method: str, mode: str, order_name: str | None, seed: int) -> dict:
    """The joint row's run (`order_name` None), or a continual run on the order."""
    if is_joint(method):
        return run_joint(bench, method, mode, seed)
    return run_continual(bench, method, mode, order_name, seed)


def _run(what: dict, metrics: dict, steps: list, seconds: float, correct: dict, routing=None) -> dict:
    """What a run file stores: `what` (method, mode, order, seed, tasks), the figures, `correct` (task -> the final
    model's per-record correctness) and `routing` (task -> the gate's weight on its own expert)."""
    run = what | {k: metrics.get(k) for k in ("acc", "bwt", "fwt")} | {"metrics": metrics, "steps": steps}
    return run | {"seconds": round(seconds, 2), "correct": correct, "routing": routing or {}}


def run_continual(bench: Bench, method: str, mode: str, order_name: str, seed: int) -> dict:
    """Train the order's tasks one after the other. b_i (`bench.zero_shot`) is shared by the rows in instruction
    mode, where the untrained model's greedy answers do not depend on the method (in classifier mode b_i goes
    through the new task's fresh head, which does, so it is scored per run)."""
    params = method_params(bench.preset, method, mode, bench.model_cfg, seed)
    seed = params.train.seed  # the preset's where `seed` is None
    base, tasks, order = bench.base, bench.tasks[mode], bench.orders[order_name]
    shared_b = bench.zero_shot if mode == "instruction" else {}
    run_dir = bench.workdir / f"{file_stem(method)}-{mode}-{order_name}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    step = functools.partial(run_step, params, base=base, progress=bench.progress)
    started, parent, evaluation, steps = time.perf_counter(), None, None, []
    for i, task_id in enumerate(order):
        bank, t0 = run_dir / f"{i}-{task_id}", time.perf_counter()
        replay = {t: tasks[t] for t in order[:i]} if params.method.replay_per_task else None
        b_i = shared_b.get(task_id)
        result = step(tasks[task_id], out_bank=bank, parent_bank=parent, replay_tasks=replay, zero_shot=b_i)
        if result.zero_shot is not None:
            shared_b.setdefault(task_id, result.zero_shot)
        t1 = time.perf_counter()
        seen, only = {t: tasks[t] for t in order[: i + 1]}, None if i == len(order) - 1 else [task_id]
        evaluation = evaluate_bank(bank, base, seen, params, progress=bench.progress, only=only)
        t2 = time.perf_counter()
        info = {"task": task_id, "step_seconds": round(t1 - t0, 2), "eval_seconds": round(t2 - t1, 2)}
        steps.append(info | result.outcome.summary())  # its losses, dev curve and the checkpoint kept on it
        parent = bank
    seconds = time.perf_counter() - started  # training and evaluation; the routing probe is not timed
    routing = {}
    if params.method.uses_gate:
        try:
            routing = final_routing(parent, base, tasks, order, params)
        except Exception as exc:  # noqa: BLE001 - a diagnostic must not cost the run its results
            print(f"routing probe failed for {method} {mode} {order_name}: {exc!r}", file=sys.stderr)
    if not bench.keep_banks:
        shutil.rmtree(run_dir, ignore_errors=True)
    what = {"method": method, "mode": mode, "order": order_name, "seed": seed, "tasks": list(order)}
    return _run(what, evaluation.metrics.as_dict(), steps, seconds, evaluation.correct, routing)


def final_routing(bank: Path, base, tasks: dict, order: list[str], params) -> dict:
    """task -> the final bank's gate weight beta_t on the task's own expert over its test prompts (moecl.routing):
    the mean over layers and the lowest and highest layer."""
    texts = {t: [r.text for r in tasks[t].test] for t in order}
    return bank_routing(bank, base, texts, params.train.max_length) or {}


def run_joint(bench: Bench, method: str, mode: str, seed: int) -> dict:
    """The upper bound on the preset's tasks (task order does not matter: one run per mode and seed). In
    instruction mode each row carries its own task's prompt; in classifier mode it goes through its own head."""
    params = method_params(bench.preset, method, mode, bench.model_cfg, seed)
    started, tasks, progress = time.perf_counter(), bench.tasks[mode], bench.progress
    seed_everything(params.train.seed)
    model, tokenizer = new_model(bench.base, params.lora, params.method)
    items, dev, names = [], {}, sorted(tasks)
    for name in names:
        task = tasks[name]
        model.add_task(TaskInfo(name, list(task.labels), task.instruction, task.positive_label))
        rows, dev[name] = task_items(model, tokenizer, task, params.train)
        items += rows
    trainable = list(model.shared_parameters().values())  # the shared LoRA and every task's head
    trainable += [p for t in model.task_ids for p in model.task_parameters(t).values()]
    groups = [{"params": trainable}]
    outcome = fit(model, tokenizer, items, dev, params, groups, progress=progress, desc="train mtl")
    t_train = time.perf_counter() - started
    evaluation = evaluate_model(model, tokenizer, tasks, params, progress=progress)
    zero_shot = dict(bench.zero_shot) if mode == "instruction" else {}  # classifier b_i: per row, not shared
    metrics = ContinualMetrics(order=names, matrix=[evaluation.row], zero_shot=zero_shot).as_dict()
    metrics["bwt"] = metrics["fwt"] = None  # not a continual run: no forgetting or transfer to measure
    outcome.train_examples, outcome.dev_examples = len(items), sum(map(len, dev.values()))
    seconds = time.perf_counter() - started
    info = {"step_seconds": round(t_train, 2), "eval_seconds": round(seconds - t_train, 2)}
    info |= outcome.summary()
    what = {"method": method, "mode": mode, "order": "joint", "seed": params.train.seed, "tasks": names}
    return _run(what, metrics, [info], seconds, evaluation.correct)


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
