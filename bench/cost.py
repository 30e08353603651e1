"""What each method costs: training step time, inference latency, peak memory, and growth with the task count.

A step is the library's own `train_step` (forward under `routed`, loss terms, backward, AdamW over exactly what a
step on the newest task trains) on fixed random batches. Times come from interleaved rounds (every contender
alive, each round one step, or one batched and one batch-1 forward pass, of each in turn; `warmup` untimed rounds,
then the median of `repeats`), so a slow spell of a shared machine cannot land on one method only. Peak memory
(the first steps) is measured with each method alone. "mtl" costs what seq_lora costs: it is not timed.
"""

from __future__ import annotations

import gc
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.params import method_params
from moecl.bank import new_model
from moecl.model.encoding import Encoded, collate, pad_id
from moecl.model.moecl_model import TaskInfo
from moecl.train.allocator import keep_freed_memory, release_freed_memory
from moecl.train.loop import optimizer_groups, train_step
from moecl.train.terms import MemorySampler, build_terms

N_LABELS = 4


def _status_mb(key: str) -> float | None:
    """A line of /proc/self/status (VmHWM: peak RSS, VmRSS: current RSS) in MiB."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) / 1024 for line in lines if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def ru_maxrss_mb() -> float:
    """The process's peak resident memory over its whole life (kilobytes on Linux, bytes on macOS)."""
    unit = 1024 * 1024 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stepper:
    """One method's model that already knows `n_tasks` synthetic tasks (s0 ... s{n-1}), two fixed batches of its
    newest task, and its training step on them."""

    def __init__(self, base, preset: dict, method: str, mode: str, n_tasks: int):
        params = method_params(preset, method, mode)
        self.model, tokenizer = new_model(base, params.lora, params.method)
        for i in range(n_tasks):
            self.model.add_task(TaskInfo(f"s{i}", [f"label{k}" for k in range(N_LABELS)], "Classify."))
        self.task_id, self.device = f"s{n_tasks - 1}", self.model.layers[0].base.down_proj.weight.device
        self.big = sum(p.numel() for p in self.model.parameters()) > 10_000_000  # (see _free)
        method, lr, task_id = params.method, params.train.lr, self.task_id
        self.batches = fixed_batches(self.model, tokenizer, task_id, preset["cost"], preset["seed"], method)
        groups = optimizer_groups(self.model, task_id, self.model.trainable_parameters(task_id), method, lr)
        self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=params.train.weight_decay)
        self.terms = build_terms(self.model, task_id, method)  # (the memory rows are in the fixed batches)
        alpha = method.adversarial_weight if self.model.has_discriminator else 0.0
        self.options, self.steps = {"alpha": alpha, "discriminator_span": method.discriminator_span}, 0

    def step(self) -> float:
        """Seconds of one forward + backward + AdamW step on the next fixed batch."""
        batch, model = self.batches[self.steps % len(self.batches)], self.model
        self.steps += 1
        _sync(self.device)
        t0 = time.perf_counter()
        train_step(model, model, batch, self.terms, self.optimizer, **self.options)
        _sync(self.device)
        return time.perf_counter() - t0

    @torch.no_grad()
    def forward(self, rows: int) -> float:
        """Seconds of one forward pass over `rows` rows: the head's logits (classifier), or the LM logits of the
        prompt's last position (instruction: what generation's prefill costs)."""
        model, batch = self.model, self.batches[0]
        model.eval()
        _sync(self.device)
        t0 = time.perf_counter()
        with model.routed([self.task_id] * rows):
            if model.mode == "classifier":
                model.classify(batch.input_ids[:rows], batch.attention_mask[:rows], self.task_id)
            else:
                model.lm_logits(batch.input_ids[:rows], batch.attention_mask[:rows], keep_last=1)
        _sync(self.device)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model.requires_grad_(False)
        self.model.eval()


def fixed_batches(model, tokenizer, task_id: str, cost: dict, seed: int, method, count: int = 2):
    """Random-token batches of one task; the last 4 tokens are the 'answer' (instruction mode's LM loss)."""
    g = torch.Generator().manual_seed(seed)
    vocab, pad, seq_len, batch_size = len(tokenizer), pad_id(tokenizer), cost["seq_len"], cost["batch_size"]

    def row(task: str, label: int = -1) -> Encoded:
        return Encoded(torch.randint(0, vocab, (seq_len,), generator=g).tolist(), seq_len - 4, label, task)

    # the task rows first (the label drawn before the row's tokens), so every method times the same task rows
    task_rows = [
        [row(task_id, int(torch.randint(0, N_LABELS, (1,), generator=g))) for _ in range(batch_size)]
        for _ in range(count)
    ]
    sampler, others = None, [t for t in model.task_ids if t != task_id]
    if method.replay_per_task and others:  # +replay: the second half of each batch is earlier tasks' rows,
        for items in task_rows:  # as in the cpu preset's last task (48 replayed rows beside its own 58)
            for k in range(batch_size // 2, batch_size):
                items[k].task_id = others[k % len(others)]
    if method.memory_per_task and model.has_discriminator:  # moecl_mem: the memory rows a real step draws
        memory = {t: [row(t).input_ids for _ in range(method.memory_per_task)] for t in others}
        sampler = MemorySampler(memory, task_id, batch_size, seed)
    device, batches = model.layers[0].base.down_proj.weight.device, []
    for items in task_rows:
        extra = sampler.before_batch() if sampler else []
        batches.append(collate(items + extra, pad, [True] * len(items) + [False] * len(extra)).to(device))
    return batches


def _median(times) -> float:
    return statistics.median(times) if times else float("nan")


def _free(big: bool) -> None:
    """Give large models' memory back before the next one is built (a full gc costs ~0.2 s: skipped for tiny
    models, which refcounting frees anyway)."""
    if big:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def measure_memory(base, preset: dict, method: str, mode: str, n_tasks: int) -> dict:
    """Peak memory of `method`'s first training steps, alone: torch.cuda.max_memory_allocated on CUDA, peak RSS
    (VmHWM, reset through /proc/self/clear_refs) on CPU; `memory_before_mb`: in use before them."""
    stepper = Stepper(base, preset, method, mode, n_tasks)
    cuda = stepper.device.type == "cuda"
    kind = "cuda_max_memory_allocated" if cuda else "peak_rss"
    if cuda:
        torch.cuda.synchronize(stepper.device)
        torch.cuda.reset_peak_memory_stats(stepper.device)
        before = torch.cuda.memory_allocated(stepper.device) / 2**20
    else:
        release_freed_memory()  # what earlier methods freed (kept for reuse while timing) would hide the peak
        before = _status_mb("VmRSS")
        try:  # Linux: writing 5 to clear_refs resets the peak RSS, so each method gets its own
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            kind = "ru_maxrss (process lifetime: no per-method reset here)"
    for _ in range(max(preset["cost"]["warmup"], 1)):  # the peak comes in the first steps
        stepper.step()
    if cuda:
        peak = torch.cuda.max_memory_allocated(stepper.device) / 2**20  # step() synchronised
    else:
        peak = _status_mb("VmHWM") if kind == "peak_rss" else ru_maxrss_mb()
    stepper.close()
    rows, big = int(stepper.batches[0].input_ids.shape[0]), stepper.big
    del stepper
    _free(big)
    peak, before = (None if v is None else round(v, 1) for v in (peak, before))
    row = {"method": method, "mode": mode, "tasks": n_tasks, "batch_rows": rows}
    return row | {"peak_memory_mb": peak, "memory_before_mb": before, "peak_memory_kind": kind}


def _rounds(steppers: dict, cost: dict, measure) -> dict[str, list]:
    """Round robin: each round measures every contender in turn; `warmup` untimed rounds, then `repeats`."""
    times = {k: [] for k in steppers}
    for i in range(cost["warmup"] + cost["repeats"]):
        for k, stepper in steppers.items():
            measured = measure(stepper)
            if i >= cost["warmup"]:
                times[k].append(measured)
    return times


def interleaved(base, preset: dict, mode: str, rows: list[dict], key: str, *, latency: bool = False) -> None:
    """Time `rows` (each a {method, tasks} contender, named by `key`) in interleaved rounds of one training step
    of each, every model alive; with `latency`, then in rounds of one batched and one batch-1 forward pass."""
    cost = preset["cost"]
    steppers = {r[key]: Stepper(base, preset, r["method"], mode, r["tasks"]) for r in rows}
    steps = _rounds(steppers, cost, Stepper.step)
    for stepper in steppers.values():
        stepper.close()
    passes = (
        _rounds(steppers, cost, lambda s: (s.forward(cost["batch_size"]), s.forward(1))) if latency else {}
    )
    big = any(s.big for s in steppers.values())
    del steppers
    _free(big)
    for row in rows:
        timed = steps[row[key]]
        row |= {"train_step_s": round(_median(timed), 5), "train_step_all_s": [round(t, 5) for t in timed]}
        row["train_step_timing"] = "interleaved"
        if latency:
            batched, single = zip(*passes[row[key]])
            row["latency_ms_per_sample"] = round(1000 * _median(batched) / cost["batch_size"], 4)
            row["latency_ms_batch1"] = round(1000 * _median(single), 4)
            row["latency_timing"] = "interleaved"


def _ratio(value, reference):
    return None if value is None or not reference else round(value / reference, 4)


def run_costs(base, preset: dict, methods: list[str], *, log=print, checkpoint=None) -> dict:
    """Every cost figure of the preset: per mode, each method's step, latency and memory, and their ratios to
    seq_lora's step and per_task_lora's latency; how the step grows with the task count. `checkpoint(partial)`
    follows every measurement (an interruption keeps them)."""
    cost = preset["cost"]
    timed = [m for m in methods if m not in ("mtl", "per_task_lora", "seq_lora")]
    timed = ["seq_lora", "per_task_lora", *timed]  # the ratios' references: always measured, and first
    settings = {k: cost[k] for k in ("batch_size", "seq_len", "warmup", "repeats", "tasks")}
    # steps are timed with memory managed as a training step manages it (moecl.train.allocator)
    keep = method_params(preset, "seq_lora", cost["modes"][0]).train.keep_freed_memory and keep_freed_memory()
    settings |= {"threads": torch.get_num_threads(), "keep_freed_memory": keep}
    out = {"settings": settings, "modes": {}, "scaling": {}}

    def done() -> None:
        out["ru_maxrss_mb"] = round(ru_maxrss_mb(), 1)
        if checkpoint is not None:
            checkpoint(out)

    for mode in cost["modes"]:
        rows = out["modes"].setdefault(mode, [])
        for method in timed:
            log(f"cost: {mode} {method} ({cost['tasks']} tasks): memory")
            rows.append(measure_memory(base, preset, method, mode, cost["tasks"]))
            done()
        log(f"cost: {mode}: {cost['repeats']} interleaved rounds of training steps, then of forward passes")
        interleaved(base, preset, mode, rows, "method", latency=True)
        seq, per_task = rows[0], rows[1]
        for r in rows:
            r["train_step_vs_seq_lora"] = _ratio(r["train_step_s"], seq.get("train_step_s"))
            for name, figure in (("latency", "latency_ms_per_sample"), ("latency_b1", "latency_ms_batch1")):
                r[f"{name}_vs_per_task_lora"] = _ratio(r.get(figure), per_task.get(figure))
        done()
    mode = cost["modes"][0]
    for method in cost["scaling_methods"]:
        points = out["scaling"].setdefault(method, {"mode": mode, "points": []})["points"]
        for n in cost["scaling_tasks"]:
            log(f"cost: scaling {mode} {method} with {n} tasks: memory")
            points.append(measure_memory(base, preset, method, mode, n))
            done()
        log(f"cost: scaling {mode} {method}: {cost['repeats']} interleaved rounds")
        interleaved(base, preset, mode, points, "tasks")
        for point in points:
            point["vs_first"] = _ratio(point["train_step_s"], points[0]["train_step_s"])
        done()
    done()
    return out
