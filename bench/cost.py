"""What each method costs: training step time, inference latency, peak memory, and growth with the task count.

Each figure times the library's own forward pass (MoECLModel under `routed`), its loss terms (the adversarial
term, O-LoRA's orthogonality penalty) and a plain AdamW step over exactly the parameters a step on the newest
task trains, on fixed random batches. Step times come from interleaved rounds (all contenders alive at once,
each round times one step of each in turn; `warmup` untimed rounds, then the median of `repeats`), so a slow
spell of the machine cannot land on one method only. Peak memory (its first steps) and inference latency
(`warmup` + median of `repeats` forward passes) are measured with each method alone. moecl_mem adds the
discriminator-memory rows a real step draws (moecl.train.terms.MemorySampler). "mtl" costs what seq_lora costs
(one shared LoRA; only the heads differ), so it is not timed separately.
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
from moecl.model.base import BaseSpec
from moecl.model.encoding import Encoded, collate, pad_id
from moecl.model.moecl_model import MoECLModel, TaskInfo
from moecl.train.loop import optimizer_groups, train_step
from moecl.train.terms import MemorySampler, build_terms

N_LABELS = 4


# ---------------------------------------------------------------------------------------------- memory


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM), so each method gets its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mb(key: str) -> float | None:
    """A memory line of /proc/self/status (VmHWM: peak RSS, VmRSS: current RSS) in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def ru_maxrss_mb() -> float:
    """The process's peak resident memory over its whole life (kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class PeakMemory:
    """Peak memory of a block: torch.cuda.max_memory_allocated on CUDA, peak RSS (VmHWM) on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mb: float | None = None
        self.before_mb: float | None = (
            None  # in use when the block starts (the peak minus this: the block's own)
        )
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "peak_rss"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        self.before_mb = _status_mb("VmRSS")
        if not _reset_peak_rss():
            self.kind = "ru_maxrss (process lifetime: no per-method reset here)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.mb = _status_mb("VmHWM") if self.kind == "peak_rss" else ru_maxrss_mb()
        return False


# ---------------------------------------------------------------------------------------------- setup


def _device(model: MoECLModel) -> torch.device:
    return model.layers[0].base.down_proj.weight.device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(base: BaseSpec, preset, method: str, mode: str, n_tasks: int) -> tuple[MoECLModel, object, object]:
    """A model of `method` that already knows n_tasks synthetic tasks (s0 ... s{n-1}); s{n-1} is the newest."""
    params = method_params(preset, method, mode)
    model, tokenizer = new_model(base, params.lora, params.method)
    for i in range(n_tasks):
        model.add_task(TaskInfo(f"s{i}", [f"label{k}" for k in range(N_LABELS)], "Classify."))
    return model, tokenizer, params


def fixed_batches(
    model: MoECLModel,
    tokenizer,
    task_id: str,
    batch_size: int,
    seq_len: int,
    count: int,
    seed: int,
    memory_per_task: int = 0,
):
    """Random-token batches of one task; the last 4 tokens are the 'answer' (instruction mode's LM loss)."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    pad = pad_id(tokenizer)

    def row(task: str, label: int = -1) -> Encoded:
        return Encoded(torch.randint(0, vocab, (seq_len,), generator=g).tolist(), seq_len - 4, label, task)

    # The task rows first, so every method times the same task rows; moecl_mem's memory rows come after.
    task_rows = [
        [row(task_id, int(torch.randint(0, N_LABELS, (1,), generator=g))) for _ in range(batch_size)]
        for _ in range(count)
    ]
    sampler = None
    if memory_per_task and model.has_discriminator:
        memory = {
            t: [row(t).input_ids for _ in range(memory_per_task)] for t in model.task_ids if t != task_id
        }
        sampler = MemorySampler(memory, task_id, batch_size, seed)
    batches = []
    for items in task_rows:
        extra = sampler.before_batch() if sampler else []
        flags = [True] * len(items) + [False] * len(extra)
        batches.append(collate(items + extra, pad, flags).to(_device(model)))
    return batches


# ---------------------------------------------------------------------------------------------- timing


def _median(times: list[float]) -> float:
    return statistics.median(times) if times else float("nan")


class TrainStepper:
    """One method's training step on its fixed batches, timed: the library's own `train_step` (forward under
    `routed`, loss terms, backward, AdamW over exactly what a step on the newest task trains)."""

    def __init__(self, model: MoECLModel, params, task_id: str, batches):
        self.model, self.task_id, self.batches = model, task_id, batches
        self.device = _device(model)
        method, lr = params.method, params.train.lr
        groups = optimizer_groups(model, task_id, model.trainable_parameters(task_id), method, lr)
        self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=params.train.weight_decay)
        self.terms = build_terms(model, task_id, method)  # the memory rows are already in the fixed batches
        self.alpha = method.adversarial_weight if model.has_discriminator else 0.0
        self.span = method.discriminator_span
        self.steps = 0

    def step(self) -> float:
        """Seconds of one forward + backward + AdamW step on the next fixed batch."""
        model, batch = self.model, self.batches[self.steps % len(self.batches)]
        self.steps += 1
        _sync(self.device)
        t0 = time.perf_counter()
        train_step(
            model, model, batch, self.terms, self.optimizer, alpha=self.alpha, discriminator_span=self.span
        )
        _sync(self.device)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()


def time_train_steps(
    model: MoECLModel, params, task_id: str, batches, warmup: int, repeats: int
) -> list[float]:
    """Seconds of each timed forward + backward + AdamW step (after `warmup` untimed ones)."""
    stepper = TrainStepper(model, params, task_id, batches)
    times = [stepper.step() for _ in range(warmup + repeats)][warmup:]
    stepper.close()
    return times


def interleaved_train_times(steppers: dict, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Round robin: every round times one step of each contender in turn, so that a slow spell of a shared
    machine falls on all of them alike rather than on whichever happened to be measured then."""
    times: dict[str, list[float]] = {key: [] for key in steppers}
    for i in range(warmup + rounds):
        for key, stepper in steppers.items():
            seconds = stepper.step()
            if i >= warmup:
                times[key].append(seconds)
    for stepper in steppers.values():
        stepper.close()
    return times


@torch.no_grad()
def time_forward(model: MoECLModel, task_id: str, input_ids, attention_mask) -> float:
    """Seconds of one forward pass over these rows of one task: the head's logits (classifier), or the LM
    logits of the prompt's last position (instruction: what generation's prefill costs)."""
    device = _device(model)
    model.eval()
    _sync(device)
    t0 = time.perf_counter()
    with model.routed([task_id] * input_ids.shape[0]):
        if model.mode == "classifier":
            model.classify(input_ids, attention_mask, task_id)
        else:
            model.lm_logits(input_ids, attention_mask, keep_last=1)
    _sync(device)
    return time.perf_counter() - t0


def interleaved_latency(contenders: dict, warmup: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Round robin over {key: (model, task_id, input_ids, attention_mask)}: every round times one batched
    forward pass and one batch-1 pass of each contender in turn (as interleaved_train_times does for steps)."""
    times = {key: {"batched": [], "single": []} for key in contenders}
    for i in range(warmup + rounds):
        for key, (model, task_id, ids, mask) in contenders.items():
            batched = time_forward(model, task_id, ids, mask)
            single = time_forward(model, task_id, ids[:1], mask[:1])
            if i >= warmup:
                times[key]["batched"].append(batched)
                times[key]["single"].append(single)
    return times


def _is_big(model: MoECLModel) -> bool:
    return sum(p.numel() for p in model.parameters()) > 10_000_000


def _collect(big: bool) -> None:
    """Give a large model's memory back before the next one is built (a full gc costs ~0.2 s: skipped for tiny
    models, which refcounting frees anyway)."""
    if big:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def contender(base: BaseSpec, preset, method: str, mode: str, n_tasks: int):
    """(model, params, newest task id, its fixed batches): what a cost measurement of `method` runs on."""
    cost = preset.cost
    model, tokenizer, params = build(base, preset, method, mode, n_tasks)
    task_id = f"s{n_tasks - 1}"
    memory = params.method.memory_per_task
    batches = fixed_batches(model, tokenizer, task_id, cost.batch_size, cost.seq_len, 2, preset.seed, memory)
    return model, params, task_id, batches


def measure_method(base: BaseSpec, preset, method: str, mode: str, n_tasks: int) -> dict:
    """Peak memory of `method`'s first training step (and that step's time, which the interleaved rounds
    replace); latency comes from interleaved_latency."""
    cost = preset.cost
    model, params, task_id, batches = contender(base, preset, method, mode, n_tasks)
    device = _device(model)
    with PeakMemory(device) as peak:  # the peak is reached in the first step; the times are replaced later
        train = time_train_steps(model, params, task_id, batches, 0, max(cost.warmup, 1))
    out = {
        "method": method,
        "mode": mode,
        "tasks": n_tasks,
        "train_step_s": round(_median(train), 5),
        "train_step_all_s": [round(t, 5) for t in train],
        "train_step_timing": "alone",
        "batch_rows": int(batches[0].input_ids.shape[0]),
        "peak_memory_mb": _round1(peak.mb),
        "memory_before_mb": _round1(peak.before_mb),
        "peak_memory_kind": peak.kind,
    }
    big = _is_big(model)
    del model, batches
    _collect(big)
    return out


def interleaved_times(base: BaseSpec, preset, mode: str, contenders: dict, *, latency: bool = False):
    """Training-step times of every contender ({key: (method, n_tasks)}), all alive at once and timed in
    interleaved rounds (interleaved_train_times); with `latency`, their forward-pass times too, also in
    interleaved rounds (interleaved_latency). Returns (step times, latency times or None)."""
    cost = preset.cost
    steppers = {
        key: TrainStepper(*contender(base, preset, method, mode, n_tasks))
        for key, (method, n_tasks) in contenders.items()
    }
    times = interleaved_train_times(steppers, cost.warmup, cost.repeats)
    latencies = None
    if latency:
        inputs = {
            key: (
                s.model,
                s.task_id,
                s.batches[0].input_ids[: cost.batch_size],
                s.batches[0].attention_mask[: cost.batch_size],
            )
            for key, s in steppers.items()
        }
        latencies = interleaved_latency(inputs, cost.warmup, cost.repeats)
        del inputs
    big = any(_is_big(s.model) for s in steppers.values())
    del steppers
    _collect(big)
    return times, latencies


def _retime(rows: list[dict], times: dict, key: str = "method") -> None:
    for row in rows:
        row["train_step_alone_s"] = row["train_step_s"]
        row["train_step_s"] = round(_median(times[row[key]]), 5)
        row["train_step_all_s"] = [round(t, 5) for t in times[row[key]]]
        row["train_step_timing"] = "interleaved"


def _retime_latency(rows: list[dict], latencies: dict, batch_size: int) -> None:
    for row in rows:
        measured = latencies[row["method"]]
        row["latency_ms_per_sample"] = round(1000 * _median(measured["batched"]) / batch_size, 4)
        row["latency_ms_batch1"] = round(1000 * _median(measured["single"]), 4)
        row["latency_timing"] = "interleaved"


def _round1(value):
    return None if value is None else round(value, 1)


def _ratio(value, reference):
    if value is None or not reference:
        return None
    return round(value / reference, 4)


def _ratios(rows: list[dict]) -> None:
    """Each row's step time / seq_lora's and latency / per_task_lora's (None until the reference is measured)."""
    by = {r["method"]: r for r in rows}
    seq, per_task = by.get("seq_lora", {}), by.get("per_task_lora", {})
    for r in rows:
        r["train_step_vs_seq_lora"] = _ratio(r["train_step_s"], seq.get("train_step_s"))
        r["latency_vs_per_task_lora"] = _ratio(
            r.get("latency_ms_per_sample"), per_task.get("latency_ms_per_sample")
        )
        r["latency_b1_vs_per_task_lora"] = _ratio(
            r.get("latency_ms_batch1"), per_task.get("latency_ms_batch1")
        )


def run_costs(base: BaseSpec, preset, methods: list[str], *, log=print, checkpoint=None) -> dict:
    """Every cost figure of the preset: per mode, each method's step/latency/memory and the ratios; scaling.

    `checkpoint(partial)` is called after every measurement, so an interrupted run keeps what it measured.
    """
    cost = preset.cost
    timed = [m for m in methods if m != "mtl"]
    for reference in ("per_task_lora", "seq_lora"):  # the ratios' references: always measured, and first
        if reference in timed:
            timed.remove(reference)
        timed.insert(0, reference)
    out = {
        "settings": {
            "batch_size": cost.batch_size,
            "seq_len": cost.seq_len,
            "warmup": cost.warmup,
            "repeats": cost.repeats,
            "tasks": cost.tasks,
            "threads": torch.get_num_threads(),
        },
        "modes": {},
        "scaling": {},
        "ru_maxrss_mb": None,
    }

    def done() -> None:
        out["ru_maxrss_mb"] = round(ru_maxrss_mb(), 1)
        if checkpoint is not None:
            checkpoint(out)

    for mode in cost.modes:
        rows = out["modes"].setdefault(mode, [])
        for method in timed:
            log(f"cost: {mode} {method} ({cost.tasks} tasks): memory")
            rows.append(measure_method(base, preset, method, mode, cost.tasks))
            _ratios(rows)
            done()
        log(f"cost: {mode}: {cost.repeats} interleaved rounds of training steps, then of forward passes")
        contenders = {r["method"]: (r["method"], cost.tasks) for r in rows}
        times, latencies = interleaved_times(base, preset, mode, contenders, latency=True)
        _retime(rows, times)
        _retime_latency(rows, latencies, cost.batch_size)
        _ratios(rows)
        done()
    mode = cost.modes[0]
    for method in cost.scaling_methods:
        block = out["scaling"].setdefault(method, {"mode": mode, "points": []})
        for n in cost.scaling_tasks:
            log(f"cost: scaling {mode} {method} with {n} tasks: memory")
            block["points"].append(measure_method(base, preset, method, mode, n))
            done()
        log(f"cost: scaling {mode} {method}: {cost.repeats} interleaved rounds")
        contenders = {p["tasks"]: (method, p["tasks"]) for p in block["points"]}
        _retime(block["points"], interleaved_times(base, preset, mode, contenders)[0], key="tasks")
        first = block["points"][0]["train_step_s"]
        for point in block["points"]:
            point["vs_first"] = _ratio(point["train_step_s"], first)
        done()
    done()
    return out
