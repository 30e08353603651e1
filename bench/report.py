"""The benchmark's output: bench/results/<name>.json (everything) and .md (the tables a reader wants).

The statistics are moecl.metrics' (spread, acc_standard_error, paired_acc_difference); this module pairs the runs
and lays out the tables.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path

import torch

from bench.params import label
from bench.presets import METHODS
from moecl.io import write_text_atomic
from moecl.metrics import acc_standard_error, mean_paired_difference, paired_acc_difference, spread
from moecl.plots import draw_method_comparison
from moecl.routing import format_share

# The rows that the paired tables compare with every other: the best MoE-CL and its replay form; in an
# ablation (one knob at a time on the paper's setting) the paper's setting, then the best.
REFERENCES = ("moecl", "moecl+replay")
ABLATION_REFERENCES = ("moecl_paper", "moecl")


def hardware() -> dict:
    """The machine and the library versions that a run's figures depend on."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    models = [x.split(":", 1)[1].strip() for x in cpuinfo if x.startswith("model name")]
    info = {
        "cpu": models[0] if models else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    info |= {"torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    info |= {"platform": platform.platform(), "torch": torch.__version__}
    for package in ("transformers", "peft", "tokenizers"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    if torch.cuda.is_available():
        info |= {"cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0)}
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def _by_rank(items: dict, methods: list[str] | None) -> list[tuple]:
    """`items` (row -> value) in the order of `methods` (default the presets' rows), other rows last by name."""
    order = list(methods or METHODS)
    return sorted(items.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))


def _run_label(run: dict) -> str:
    return f"{run['order']}/s{run.get('seed', 42)}"


def summarise(runs: list[dict], data: dict | None = None, methods: list[str] | None = None) -> dict:
    """mode -> row -> {acc, bwt, fwt: spread over the row's runs (orders and seeds); acc_se: ACC's test-sampling
    standard error, mean over runs; orders, runs: "order/seed" of each}. `data`: mode -> task -> {"test": n}
    (bench.tasks.data_summary). Rows in the order of `methods`."""
    groups: dict = {}
    for run in runs:
        groups.setdefault(run["mode"], {}).setdefault(run["method"], []).append(run)
    out: dict = {}
    for mode, by_method in groups.items():
        sizes = {t: d.get("test") for t, d in ((data or {}).get(mode) or {}).items()}
        for method, group in _by_rank(by_method, methods):
            row = {k: spread([r[k] for r in group]) for k in ("acc", "bwt", "fwt")}
            se = [acc_standard_error(r["metrics"].get("per_task"), sizes) for r in group]
            row |= {"acc_se": spread(se)["mean"], "orders": [r["order"] for r in group]}
            out.setdefault(mode, {})[method] = row | {"runs": [_run_label(r) for r in group]}
    return out


def paired_comparisons(runs: list[dict], methods: list[str] | None = None, references=REFERENCES) -> dict:
    """reference -> mode -> other row -> ACC(reference) - ACC(other), paired record by record.

    Each reference run pairs with the other row's run of the same order and seed (the joint `mtl` run with every
    order; a reference run whose seed the other row lacks is left unpaired): the difference (spread over the
    pairs), its paired standard error (mean over pairs) and the records only one side got right, summed.
    References: those of `references` that were run, else the first moecl row there is. Runs without per-record
    correctness are left out."""
    marked = [r for r in runs if r.get("correct")]
    present = {r["method"] for r in marked}
    firsts = [m for m in (methods or sorted(present)) if m in present and m.startswith("moecl")][:1]
    out: dict = {}
    for reference in [m for m in references if m in present] or firsts:
        table: dict = {}
        for ref in (r for r in marked if r["method"] == reference):
            for other in sorted(present - {reference}):
                candidates = [r for r in marked if r["method"] == other and r["mode"] == ref["mode"]]
                candidates = [r for r in candidates if r["order"] in (ref["order"], "joint")]
                same_seed = [r for r in candidates if r.get("seed", 42) == ref.get("seed", 42)]
                if same_seed:  # another seed's run would mix training-seed noise into the paired figure
                    pair = paired_acc_difference(ref["correct"], same_seed[0]["correct"])
                    table.setdefault(ref["mode"], {}).setdefault(other, []).append((_run_label(ref), pair))
        out[reference] = {
            mode: {other: _pooled(pairs) for other, pairs in _by_rank(others, methods)}
            for mode, others in table.items()
        }
    return out


def _pooled(pairs: list[tuple]) -> dict:
    """A paired table's row from the (run label, moecl.metrics.PairedDifference) of each pair of runs."""
    return {
        "diff": spread([p.diff for _, p in pairs]),
        "se": spread([p.se for _, p in pairs])["mean"],
        "reference_only": sum(p.a_only for _, p in pairs),
        "other_only": sum(p.b_only for _, p in pairs),
        "records": sum(p.records for _, p in pairs),
        "orders": [o for o, _ in pairs],
        "by_run": {o: {"diff": p.diff, "se": p.se} for o, p in pairs},
        "over_runs": mean_paired_difference([p for _, p in pairs]),
    }


def instrument_check(runs: list[dict], upper: str = "mtl", lower: str = "seq_lora") -> dict:
    """Can the benchmark see a gap as large as the one the method claims? mode -> ACC(mtl) - ACC(seq_lora),
    paired on the same records: the first seed's pair (diff, paired standard error, ratio) and, where more
    seeds ran both rows, their mean over seeds (moecl.metrics.mean_paired_difference)."""
    out = {}
    for mode in sorted({r["mode"] for r in runs}):
        by_seed: dict = {}
        for r in runs:
            if r["mode"] == mode and r.get("correct") and r["method"] in (upper, lower):
                by_seed.setdefault(r.get("seed", 42), {}).setdefault(r["method"], r)
        pairs = [
            paired_acc_difference(both[upper]["correct"], both[lower]["correct"])
            for both in by_seed.values()
            if len(both) == 2
        ]
        if pairs:
            first = pairs[0]
            ratio = first.diff / first.se if first.se else None
            out[mode] = {"diff": first.diff, "se": first.se, "ratio": ratio}
            out[mode]["over_runs"] = mean_paired_difference(pairs)
    return out


def write_results(out_dir: Path, name: str, result: dict) -> tuple[Path, Path]:
    """Write <name>.json and <name>.md atomically (the run rewrites them after every finished run), and once
    finished the figure of each mode."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / f"{name}.json", out_dir / f"{name}.md")
    write_text_atomic(paths[0], json.dumps(result, indent=2, sort_keys=False, default=str))
    write_text_atomic(paths[1], markdown(result))
    for mode, rows in result.get("summary", {}).items() if result.get("finished") else ():
        # where rows differ in how many runs they average (seeds, orders), each label says its count
        mixed = len({len(s["runs"]) for s in rows.values()}) > 1
        shown = {
            label(m) + (f" ({len(s['runs'])})" if mixed else ""): {
                "acc": s["acc"]["mean"],
                "bwt": s["bwt"]["mean"],
                "acc_se": s["acc_se"],
            }
            for m, s in rows.items()
        }
        title = f"{result['preset']} preset, {mode} mode: mean over each row's runs"
        title += " (n: how many)" if mixed else ""
        draw_method_comparison(shown, out_dir / f"{name}-{mode}.png", title)
    return paths


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _pm(s: dict) -> str:
    return (
        "–" if s["mean"] is None else _fmt(s["mean"]) + (f" ± {s['std']:.3f}" if s["std"] is not None else "")
    )


def _cost_cell(key: str, value) -> str:
    """Seconds and milliseconds to 3 significant digits, ratios as 1.23x, MiB whole."""
    spec = ".0f" if key.endswith("_mb") else ".2f" if "_vs_" in key or key == "vs_first" else ".3g"
    return "–" if value is None else f"{value:{spec}}" + ("x" if spec == ".2f" else "")


def _table(header: list[str], rows: list[list], title: str = "") -> list[str]:
    """A markdown table (under `title`, where given), then a blank line."""
    lines = [title, ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows] + [""]


# What each table means is in bench/README.md ("Reading the results"); each section links its paragraph.
_HOW = "[How to read it](../README.md#{}) (bench/README.md)"


def markdown(result: dict) -> str:
    hw, backbone, runs = result["hardware"], result.get("backbone", {}), result.get("runs", [])
    sha, gpu = str(backbone.get("sha256"))[:12], f", GPU {hw['gpu']}" if hw.get("gpu") else ""
    partial = "" if result.get("finished") else " (in progress or interrupted: partial results)"
    lines = [f"# moecl benchmark: preset `{result['preset']}`", "", result["config"].get("description", "")]
    lines += ["", f"- command: `{result['command']}`", f"- started: {result['started']}"]
    lines += [
        f"- wall time: {_fmt(result.get('wall_seconds'), 1)} s{partial}",
        f"- backbone: {backbone.get('name')} ({backbone.get('dtype', '?')}, sha256 {sha})",
        f"- hardware: {hw.get('cpu')}, {hw.get('torch_threads')} torch threads{gpu}; torch {hw.get('torch')}, "
        f"transformers {hw.get('transformers')}",
        "",
    ]
    if result.get("not_run"):
        skipped = ", ".join(f"{r['method']}/{r['mode']}/{r['order']}/s{r['seed']}" for r in result["not_run"])
        lines += [f"> Not run ({result['not_run'][0]['why']}): {skipped}", ""]
    lines += [f"> {note}" for note in result.get("notes", [])] + ([""] if result.get("notes") else [])
    if result.get("summary"):
        lines += [
            "## Accuracy (ACC), backward transfer (BWT), forward transfer (FWT)",
            "",
            _HOW.format("accuracy"),
            "",
        ]
    for mode, rows in result.get("summary", {}).items():
        cells = [
            [label(m), _pm(s["acc"]), _fmt(s.get("acc_se")), _pm(s["bwt"]), _pm(s["fwt"])]
            + [", ".join(s.get("runs") or s["orders"])]
            for m, s in rows.items()
        ]
        lines += _table(["method", "ACC", "ACC s.e.", "BWT", "FWT", "runs"], cells, f"### {mode} mode")
        lines += _acc_by_run(runs, mode, rows)
        if result.get("finished"):
            lines += [f"![ACC and BWT of each row]({result['name']}-{mode}.png)", ""]
    for mode, check in (result.get("instrument") or {}).items():
        ratio, over = check["ratio"], check.get("over_runs") or {"n": 0}
        resolved = ratio and ratio >= 3
        verdict = (
            "the benchmark resolves" if resolved else "under 3: the benchmark cannot be trusted to resolve"
        )
        lines += [
            f"Instrument ({mode} mode): mtl − seq_lora = {check['diff']:+.3f} at {_fmt(ratio, 1)} paired standard "
            f"errors ({verdict} a gap of that size)"
            + (
                f"; mean over the runs {_over_runs(over)} (s.e. test; s.e. between runs)"
                if over["n"] > 1
                else ""
            ),
            "",
        ]
    for reference, by_mode in (result.get("paired") or {}).items():
        name = label(reference)
        lines += [f"## {name} against each row, record by record", "", _HOW.format("paired"), ""]
        for mode, others in by_mode.items():
            header = ["vs", "diff", "paired s.e.", "diff / s.e.", "ref only", "other only", "records"]
            cells = [
                [
                    label(o),
                    _pm(c["diff"]),
                    _fmt(c["se"]),
                    _fmt(c["diff"]["mean"] / c["se"], 1) if c["se"] else "–",
                ]
                + [c[k] for k in ("reference_only", "other_only", "records")]
                for o, c in others.items()
            ]
            if any(len(c["by_run"]) > 1 for c in others.values()):  # each pair of runs alone: diff (s.e.)
                header += ["by run", "mean of the runs (s.e. test; s.e. between runs)"]
                for row, c in zip(cells, others.values()):
                    row.append(
                        "; ".join(f"{o} {d['diff']:+.3f} ({d['se']:.3f})" for o, d in c["by_run"].items())
                    )
                    row.append(_over_runs(c["over_runs"]))
            lines += _table(header, cells, f"### {mode} mode")
    routed = [r for r in runs if r.get("routing")]
    if routed:
        lines += [
            "## The gate: weight on each task's own expert in the final model",
            "",
            _HOW.format("gate"),
            "",
        ]
        tasks = list(dict.fromkeys(t for r in routed for t in r["routing"]))
        cells = [
            [f"{label(r['method'])} · {r['mode']} · {_run_label(r)}"]
            + [format_share(r["routing"][t]) if t in r["routing"] else "–" for t in tasks]
            for r in routed
        ]
        lines += _table(["run"] + tasks, cells)
    if runs:
        lines += ["## Accuracy matrices", "", _HOW.format("matrices"), ""]
    for run in runs:
        m, order = run["metrics"], run["metrics"]["order"]
        lines += [
            f"**{label(run['method'])} · {run['mode']} · {_run_label(run)}** — ACC {_fmt(run['acc'])}, "
            f"BWT {_fmt(run['bwt'])}, FWT {_fmt(run['fwt'])}, {_fmt(run['seconds'], 0)} s",
            "",
        ]
        rows = [
            ["joint" if run["order"] == "joint" else m["steps"][i]] + row for i, row in enumerate(m["matrix"])
        ]
        for name, key in (("before", "before_training"), ("b", "zero_shot")):
            rows += [[name] + [m[key].get(t) for t in order]] if m.get(key) else []
        lines += _table(["after"] + order, rows)
    lines += _cost_markdown(result["cost"]) if result.get("cost") else []
    reused = sum(1 for r in runs if r.get("reused"))
    if reused:
        lines += [
            f"{reused} of {len(runs)} runs were read back from their stored files "
            f"({result['selected'].get('runs_dir')}), run in earlier invocations with the same settings.",
            "",
        ]
    return "\n".join(lines + ["## Preset", "", "```json", json.dumps(result["config"], indent=1), "```", ""])


def _over_runs(m: dict) -> str:
    if m["n"] < 2:
        return "–"
    return f"{m['mean']:+.3f} ({m['se_test']:.3f}; {m['se_seeds']:.3f}; {m['n']} runs)"


def _acc_by_run(runs: list[dict], mode: str, rows: dict) -> list[str]:
    """Where a row has several runs: each run's ACC in its own column (order/seed); the joint row's run stands
    in every column of its seed."""
    runs = [r for r in runs if r["mode"] == mode]
    columns = sorted({_run_label(r) for r in runs if r["order"] != "joint"})
    if len(columns) < 2 or not any(len(s["runs"]) > 1 for s in rows.values()):
        return []
    acc = {}
    for r in runs:
        for column in columns:
            if _run_label(r) == column or (
                r["order"] == "joint" and column.endswith(f"/s{r.get('seed', 42)}")
            ):
                acc[r["method"], column] = r["acc"]
    cells = [[label(m)] + [acc.get((m, column)) for column in columns] for m in rows]
    return ["ACC of each run:", ""] + _table(["method"] + columns, cells)


def _cost_markdown(cost: dict) -> list[str]:
    s = cost["settings"]
    sizes = f"Batches of {s['batch_size']} x {s['seq_len']} tokens, {s['tasks']} tasks in the model, {s['threads']} "
    sizes += f"threads; median of {s['repeats']} interleaved rounds after {s['warmup']} warm-up. "
    lines = ["## Cost", "", sizes + _HOW.format("cost"), ""]
    header = ["method", "step s", "step / seq_lora", "latency ms/sample", "latency / per_task"]
    header += ["latency ms (batch 1)", "batch-1 / per_task", "peak MiB", "MiB before"]
    keys = ["train_step_s", "train_step_vs_seq_lora", "latency_ms_per_sample", "latency_vs_per_task_lora"]
    keys += ["latency_ms_batch1", "latency_b1_vs_per_task_lora", "peak_memory_mb", "memory_before_mb"]
    for mode, rows in cost["modes"].items():
        cells = [[r["method"]] + [_cost_cell(k, r.get(k)) for k in keys] for r in rows]
        lines += _table(header, cells, f"### {mode} mode")
    keys = ["train_step_s", "vs_first", "peak_memory_mb"]
    for method, block in cost.get("scaling", {}).items():
        cells = [[p["tasks"]] + [_cost_cell(k, p.get(k)) for k in keys] for p in block["points"]]
        title = f"### Step time against the number of tasks: {method} ({block['mode']} mode)"
        lines += _table(["tasks", "step s", "vs 1 task", "peak MiB"], cells, title)
    kind = next((r["peak_memory_kind"] for rows in cost["modes"].values() for r in rows), "")
    return lines + [f"Peak memory: {kind}; process ru_maxrss {cost.get('ru_maxrss_mb')} MiB.", ""]
