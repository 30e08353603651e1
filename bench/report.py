"""The benchmark's output: bench/results/<preset>.json (everything) and .md (the tables a reader wants)."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from pathlib import Path

import torch

from bench.presets import METHODS
from bench.routing import format_share
from bench.variants import parse_variant
from moecl.io import write_text_atomic
from moecl.metrics import paired_acc_difference

# ---------------------------------------------------------------------------------------------- facts


def hardware() -> dict:
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    for package in ("transformers", "peft", "tokenizers"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


# ---------------------------------------------------------------------------------------------- summary


def spread(values: list) -> dict:
    """Mean, sample standard deviation (None for one value), min, max and count of the non-missing values."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": round(statistics.fmean(kept), 6),
        "std": round(statistics.stdev(kept), 6) if len(kept) > 1 else None,
        "min": round(min(kept), 6),
        "max": round(max(kept), 6),
        "n": len(kept),
    }


def acc_standard_error(per_task: dict[str, float], test_sizes: dict[str, int]) -> float | None:
    """The standard error of ACC that sampling the test records alone implies: each task's accuracy is a
    binomial proportion p_j over n_j records, so SE = sqrt(sum_j p_j (1 - p_j) / n_j) / T."""
    cells = [(p, test_sizes.get(t)) for t, p in (per_task or {}).items() if p is not None]
    if not cells or any(not n for _, n in cells):
        return None
    return round(math.sqrt(sum(p * (1 - p) / n for p, n in cells)) / len(cells), 6)


def summarise(runs: list[dict], data: dict | None = None, methods: list[str] | None = None) -> dict:
    """mode -> method -> {acc, bwt, fwt: spread over the method's runs (orders and seeds); acc_se: ACC's
    test-sampling standard error, averaged over runs; runs: "order/seed" of each}. `data`: mode -> task ->
    {"test": n, ...} (bench.tasks.data_summary). Rows in the order of `methods`."""
    out: dict = {}
    for run in runs:
        out.setdefault(run["mode"], {}).setdefault(run["method"], []).append(run)

    def se(mode: str, group: list[dict]) -> float | None:
        sizes = {t: d.get("test") for t, d in ((data or {}).get(mode) or {}).items()}
        values = [acc_standard_error(r["metrics"].get("per_task"), sizes) for r in group]
        return spread(values)["mean"]

    return {
        mode: {
            method: {k: spread([r[k] for r in group]) for k in ("acc", "bwt", "fwt")}
            | {
                "acc_se": se(mode, group),
                "orders": [r["order"] for r in group],
                "runs": [_run_label(r) for r in group],
            }
            for method, group in sorted(by_method.items(), key=lambda kv: _method_rank(kv[0], methods))
        }
        for mode, by_method in out.items()
    }


def label(method: str) -> str:
    """How the tables name a row: `moecl (paper)`, `moecl (best)+replay`, `seq_lora`..."""
    try:
        return parse_variant(method).label
    except SystemExit:
        return method


def _run_label(run: dict) -> str:
    return f"{run['order']}/s{run.get('seed', 42)}"


# The rows that the paired tables compare with every other: the best MoE-CL, and its replay form.
REFERENCES = ("moecl", "moecl+replay")


def paired_comparisons(runs: list[dict], methods: list[str] | None = None) -> dict:
    """reference -> mode -> other row -> ACC(reference) - ACC(other), paired record by record.

    Each reference run is paired with the other row's run of the same order and seed (the joint `mtl` run with
    every order; a row run with fewer seeds pairs with its first). Per row: the difference (spread over the
    pairs) and its paired standard error (mean over pairs), and the records only one side got right, summed.
    References: REFERENCES that were run, else the first moecl row there is. Runs without per-record
    correctness are left out.
    """
    with_marks = [r for r in runs if r.get("correct")]
    present = {r["method"] for r in with_marks}
    references = [m for m in REFERENCES if m in present] or [
        m for m in (methods or sorted(present)) if m in present and m.startswith("moecl")
    ][:1]
    out: dict = {}
    for reference in references:
        table: dict = {}
        for ref in (r for r in with_marks if r["method"] == reference):
            for other in sorted({r["method"] for r in with_marks} - {reference}):
                candidates = [
                    r
                    for r in with_marks
                    if r["method"] == other
                    and r["mode"] == ref["mode"]
                    and r["order"] in (ref["order"], "joint")
                ]
                if not candidates:
                    continue
                same_seed = [r for r in candidates if r.get("seed", 42) == ref.get("seed", 42)]
                run = (same_seed or candidates)[0]
                pair = paired_acc_difference(ref["correct"], run["correct"])
                table.setdefault(ref["mode"], {}).setdefault(other, []).append((_run_label(ref), pair))
        out[reference] = {
            mode: {
                other: {
                    "diff": spread([p.diff for _, p in pairs]),
                    "se": spread([p.se for _, p in pairs])["mean"],
                    "reference_only": sum(p.a_only for _, p in pairs),
                    "other_only": sum(p.b_only for _, p in pairs),
                    "records": sum(p.records for _, p in pairs),
                    "orders": [o for o, _ in pairs],
                }
                for other, pairs in sorted(others.items(), key=lambda kv: _method_rank(kv[0], methods))
            }
            for mode, others in table.items()
        }
    return out


def instrument_check(runs: list[dict], upper: str = "mtl", lower: str = "seq_lora") -> dict:
    """Can the benchmark see a difference as large as the one the method claims? mode -> ACC(mtl) -
    ACC(seq_lora), paired on the same records (their first runs), with its paired standard error."""
    out = {}
    for mode in sorted({r["mode"] for r in runs}):
        first = {}
        for r in runs:
            if r["mode"] == mode and r.get("correct") and r["method"] in (upper, lower):
                first.setdefault(r["method"], r)
        if len(first) == 2:
            pair = paired_acc_difference(first[upper]["correct"], first[lower]["correct"])
            out[mode] = {"diff": pair.diff, "se": pair.se, "ratio": pair.diff / pair.se if pair.se else None}
    return out


def zero_shot_table(runs: list[dict]) -> dict:
    """mode -> task -> b_i (instruction mode: one value for all methods; classifier mode: per method)."""
    out: dict = {}
    for run in runs:
        for task, value in (run["metrics"].get("zero_shot") or {}).items():
            out.setdefault(run["mode"], {}).setdefault(task, {})[run["method"]] = value
    return {
        mode: {
            task: (next(iter(set(v.values()))) if len(set(v.values())) == 1 else v)
            for task, v in tasks.items()
        }
        for mode, tasks in out.items()
    }


def _method_rank(method: str, methods: list[str] | None = None) -> tuple[int, str]:
    order = list(methods or METHODS)
    return (order.index(method) if method in order else len(order), method)


# ---------------------------------------------------------------------------------------------- files


def write_results(out_dir: Path, name: str, result: dict) -> tuple[Path, Path]:
    """Write <name>.json and <name>.md atomically (the run rewrites them after every finished run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / f"{name}.json", out_dir / f"{name}.md")
    texts = (json.dumps(result, indent=2, sort_keys=False, default=str), markdown(result))
    for path, text in zip(paths, texts):
        write_text_atomic(path, text)
    return paths


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pm(s: dict) -> str:
    if s["mean"] is None:
        return "–"
    return _fmt(s["mean"]) + (f" ± {s['std']:.3f}" if s["std"] is not None else "")


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def markdown(result: dict) -> str:
    lines = [
        f"# moecl benchmark: preset `{result['preset']}`",
        "",
        f"{result['config'].get('description', '')}",
        "",
        f"- command: `{result['command']}`",
        f"- started: {result['started']}",
        f"- wall time: {_fmt(result.get('wall_seconds'), 1)} s"
        + ("" if result.get("finished") else " (in progress or interrupted: partial results)"),
        f"- backbone: {result.get('backbone', {}).get('name')} "
        f"({result.get('backbone', {}).get('dtype', '?')}, sha256 {str(result.get('backbone', {}).get('sha256'))[:12]})",
        f"- hardware: {result['hardware'].get('cpu')}, {result['hardware'].get('torch_threads')} torch threads"
        + (f", GPU {result['hardware']['gpu']}" if result["hardware"].get("gpu") else "")
        + f"; torch {result['hardware'].get('torch')}, transformers {result['hardware'].get('transformers')}",
        "",
    ]
    if result.get("not_run"):
        skipped = ", ".join(f"{r['method']}/{r['mode']}/{r['order']}" for r in result["not_run"])
        lines.append(f"> Not run ({result['not_run'][0]['why']}): {skipped}")
        lines.append("")
    for note in result.get("notes", []):
        lines.append(f"> {note}")
    if result.get("notes"):
        lines.append("")
    if result.get("summary"):
        lines += [
            "## Accuracy (ACC), backward transfer (BWT), forward transfer (FWT)",
            "",
            "Mean ± sample std over the runs of each row (task orders and training seeds, listed in `runs`). "
            "`mtl` is the joint multi-task upper bound (not continual). `ACC s.e.`: the standard error of ACC "
            "that the finite test sample alone implies (binomial, sqrt(Σ p(1−p)/n) / T); the paired table "
            "below is the one that tells two rows apart.",
            "",
        ]
    for mode, methods in result.get("summary", {}).items():
        lines += [f"### {mode} mode", ""]
        rows = [
            [
                label(m),
                _pm(s["acc"]),
                _fmt(s.get("acc_se")),
                _pm(s["bwt"]),
                _pm(s["fwt"]),
                ", ".join(s.get("runs") or s["orders"]),
            ]
            for m, s in methods.items()
        ]
        lines += _table(["method", "ACC", "ACC s.e.", "BWT", "FWT", "runs"], rows) + [""]
    for mode, check in (result.get("instrument") or {}).items():
        ratio = check["ratio"]
        lines += [
            f"Instrument ({mode} mode): mtl − seq_lora = {check['diff']:+.3f} at {_fmt(ratio, 1)} paired standard "
            "errors"
            + (
                " (the benchmark resolves a gap of that size)"
                if ratio and ratio >= 3
                else " (under 3: the benchmark cannot be trusted to resolve a gap of that size)"
            ),
            "",
        ]
    for reference, by_mode in (result.get("paired") or {}).items():
        name = label(reference)
        lines += [
            f"## {name} against each row, record by record",
            "",
            f"ACC({name}) − ACC(row) on the same test records, with the standard error of that paired "
            "difference (per task var(d)/n of the per-record differences d ∈ {−1, 0, 1}; sqrt of the sum over "
            "tasks / T; mean over the paired runs, same order and seed). Records both get right or both get "
            "wrong cancel, so this is the figure that says whether two rows differ. `ref only` / `other only`: "
            "records (all paired runs) that just one of the two answered right. |diff| / s.e. above about 2 is "
            "a difference the test sample resolves; the s.e. counts test-sampling noise only, not what another "
            "training seed would change (the runs' spread in the table above shows that).",
            "",
        ]
        for mode, others in by_mode.items():
            lines += [f"### {mode} mode", ""]
            rows = [
                [
                    label(other),
                    _pm(c["diff"]),
                    _fmt(c["se"]),
                    _fmt(c["diff"]["mean"] / c["se"], 1) if c["se"] else "–",
                    c["reference_only"],
                    c["other_only"],
                    c["records"],
                ]
                for other, c in others.items()
            ]
            lines += _table(
                ["vs", "diff", "paired s.e.", "diff / s.e.", "ref only", "other only", "records"], rows
            )
            lines.append("")
    routed = [r for r in result.get("runs", []) if r.get("routing")]
    if routed:
        lines += [
            "## The gate: weight on each task's own expert in the final model",
            "",
            "beta_t of FFN = beta_s FFN_shared + beta_t FFN_t, averaged over the real tokens of each task's test "
            "prompts: the mean over layers [lowest, highest layer]. A task's frozen expert protects it only "
            "as far as the gate routes to it; 0.5 is the untrained gate.",
            "",
        ]
        tasks = list(dict.fromkeys(t for r in routed for t in r["routing"]))
        rows = [
            [f"{label(r['method'])} · {r['mode']} · {_run_label(r)}"]
            + [format_share(r["routing"][t]) if t in r["routing"] else "–" for t in tasks]
            for r in routed
        ]
        lines += _table(["run"] + tasks, rows) + [""]
    zero = result.get("zero_shot", {})
    if zero:
        lines += ["## Zero-shot accuracy of the untrained model (b_i)", ""]
        for mode, tasks in zero.items():
            shown = {
                t: (
                    v if not isinstance(v, dict) else statistics.fmean(x for x in v.values() if x is not None)
                )
                for t, v in tasks.items()
            }
            lines += [
                f"{mode}: "
                + ", ".join(f"{t} {_fmt(v)}" for t, v in shown.items())
                + (
                    " (classifier mode: through each run's fresh random head; mean over methods)"
                    if mode == "classifier"
                    else ""
                ),
                "",
            ]
    if result.get("runs"):
        lines += [
            "## Accuracy matrices",
            "",
            "R[i][j] = accuracy on task j after training the i-th task; only the cells the metrics read are "
            "evaluated (the diagonal, the final row), `–` elsewhere. `before` = R[i-1][i], `b` = zero-shot.",
            "",
        ]
    for run in result.get("runs", []):
        m = run["metrics"]
        order = m["order"]
        lines += [
            f"**{label(run['method'])} · {run['mode']} · {_run_label(run)}** — ACC {_fmt(run['acc'])}, "
            f"BWT {_fmt(run['bwt'])}, FWT {_fmt(run['fwt'])}, {_fmt(run['seconds'], 0)} s",
            "",
        ]
        header = ["after"] + order
        rows = [
            ["joint" if run["order"] == "joint" else m["steps"][i]] + row for i, row in enumerate(m["matrix"])
        ]
        if m.get("before_training"):
            rows.append(["before"] + [m["before_training"].get(t) for t in order])
        if m.get("zero_shot"):
            rows.append(["b"] + [m["zero_shot"].get(t) for t in order])
        lines += _table(header, rows) + [""]
    cost = result.get("cost")
    if cost:
        lines += _cost_markdown(cost)
    reused = sum(1 for r in result.get("runs", []) if r.get("reused"))
    if reused:
        lines += [
            f"{reused} of {len(result['runs'])} runs were read back from their stored files "
            f"({result['selected'].get('runs_dir')}), run in earlier invocations with the same settings.",
            "",
        ]
    lines += ["## Preset", "", "```json", json.dumps(result["config"], indent=1), "```", ""]
    return "\n".join(lines)


def _g(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def _x(value) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _mb(value) -> str:
    return "–" if value is None else f"{value:.0f}"


def _cost_markdown(cost: dict) -> list[str]:
    s = cost["settings"]
    warmup = f"{s['warmup']} warm-up round" + ("" if s["warmup"] == 1 else "s")
    lines = [
        "## Cost",
        "",
        f"Fixed random batches of {s['batch_size']} x {s['seq_len']} tokens, {s['tasks']} tasks in the model, "
        f"{s['threads']} torch threads. Step time: the median of {s['repeats']} interleaved rounds (every "
        f"method's model alive, each round one step of each in turn) after {warmup}. Latency: the same "
        f"way, {warmup} then the median of {s['repeats']} interleaved rounds. Train step = forward + "
        "backward + AdamW on what a step on the newest task trains. Latency = one forward pass (classifier: "
        "head logits; instruction: the prompt's prefill, LM logits of the last position as generation "
        "computes them). moecl_mem's batches carry the discriminator-memory rows. mtl costs what seq_lora "
        "costs.",
        "",
    ]
    for mode, rows in cost["modes"].items():
        lines += [f"### {mode} mode", ""]
        table = [
            [
                r["method"],
                _g(r["train_step_s"]),
                _x(r.get("train_step_vs_seq_lora")),
                _g(r.get("latency_ms_per_sample")),
                _x(r.get("latency_vs_per_task_lora")),
                _g(r.get("latency_ms_batch1")),
                _x(r.get("latency_b1_vs_per_task_lora")),
                _mb(r["peak_memory_mb"]),
                _mb(r["memory_before_mb"]),
            ]
            for r in rows
        ]
        lines += _table(
            [
                "method",
                "step s",
                "step / seq_lora",
                "latency ms/sample",
                "latency / per_task",
                "latency ms (batch 1)",
                "batch-1 / per_task",
                "peak MiB",
                "MiB before",
            ],
            table,
        ) + [""]
    for method, block in cost.get("scaling", {}).items():
        lines += [f"### Step time against the number of tasks: {method} ({block['mode']} mode)", ""]
        lines += _table(
            ["tasks", "step s", "vs 1 task", "peak MiB"],
            [
                [p["tasks"], _g(p["train_step_s"]), _x(p.get("vs_first")), _mb(p["peak_memory_mb"])]
                for p in block["points"]
            ],
        )
        lines.append("")
    kind = next((r["peak_memory_kind"] for rows in cost["modes"].values() for r in rows), "")
    lines += [f"Peak memory: {kind}; process ru_maxrss {cost.get('ru_maxrss_mb')} MiB.", ""]
    return lines
