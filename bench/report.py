"""The benchmark's output: bench/results/<name>.json (everything) and .md (the tables a reader wants).

The statistics, and pairing the runs, are moecl.metrics' (summarise_runs, paired_comparisons, instrument_check);
this module chooses the reference rows and lays out the tables.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.params import label
from moecl import metrics
from moecl.io import write_text_atomic
from moecl.plots import draw_method_comparison
from moecl.routing import format_share

# The rows that the paired tables compare with every other: MoE-CL without and with replay, and the joint upper
# bound (how far each row is from it); in an ablation (one knob at a time on the paper's setting) the paper's
# setting, then the best.
REFERENCES = ("moecl", "moecl+replay", "mtl")
ABLATION_REFERENCES = ("moecl_paper", "moecl")


def references(runs: list[dict], shown: list[str], ablation: bool = False) -> list[str]:
    """The rows the paired tables compare with every other: those of REFERENCES (ABLATION_REFERENCES) that ran
    with per-record marks, else the first moecl row of `shown` that did."""
    ran = [m for m in shown if any(r["method"] == m and r.get("correct") for r in runs)]
    wanted = [m for m in (ABLATION_REFERENCES if ablation else REFERENCES) if m in ran]
    return wanted or [m for m in ran if m.startswith("moecl")][:1]


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
        shown = {label(m) + (f" ({len(s['runs'])})" if mixed else ""): _bar(s) for m, s in rows.items()}
        title = f"{result['preset']} preset, {mode} mode: mean over each row's runs"
        path = out_dir / f"{name}-{mode}.png"
        draw_method_comparison(shown, path, title + (" (n: how many)" if mixed else ""))
    return paths


def _bar(s: dict) -> dict:
    """A row's bars in the figure: ACC with its standard error, BWT."""
    return {"acc": s["acc"]["mean"], "bwt": s["bwt"]["mean"], "acc_se": s["acc_se"]}


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _pm(s: dict) -> str:
    """Mean ± sample std of a `spread`."""
    std = f" ± {s['std']:.3f}" if s["std"] is not None else ""
    return "–" if s["mean"] is None else _fmt(s["mean"]) + std


def _over_runs(m: dict) -> str:
    """A `mean_paired_difference` with both its standard errors."""
    if m["n"] < 2:
        return "–"
    return f"{m['mean']:+.3f} ({m['se_test']:.3f}; {m['se_seeds']:.3f}; {m['n']} runs)"


def _cost_cell(key: str, value) -> str:
    """Seconds and milliseconds to 3 significant digits, ratios as 1.23x, MiB whole."""
    spec = ".0f" if key.endswith("_mb") else ".2f" if "_vs_" in key or key == "vs_first" else ".3g"
    return "–" if value is None else f"{value:{spec}}" + ("x" if spec == ".2f" else "")


def _table(header: list[str], rows: list[list], title: str = "") -> list[str]:
    """A markdown table (under `title`, where given), then a blank line; cells through `_fmt`."""
    lines = [title, ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows] + [""]


# What each table means is in bench/README.md ("Reading the results"); each section links its paragraph.
_HOW = "[How to read it](../README.md#{}) (bench/README.md)"


def _section(title: str, anchor: str) -> list[str]:
    return [f"## {title}", "", _HOW.format(anchor), ""]


def markdown(result: dict) -> str:
    """The results file: what ran and where, then each kind of figure there is, then the preset."""
    runs = result.get("runs", [])
    lines = _header(result) + _accuracy(result)
    for mode, check in (result.get("instrument") or {}).items():
        lines += [_instrument(mode, check), ""]
    for reference, by_mode in (result.get("paired") or {}).items():
        lines += _paired(reference, by_mode)
    lines += _gate([r for r in runs if r.get("routing")]) + _matrices(runs)
    lines += _cost(result["cost"]) if result.get("cost") else []
    lines += _reused(result)
    return "\n".join(lines + ["## Preset", "", "```json", json.dumps(result["config"], indent=1), "```", ""])


def _header(result: dict) -> list[str]:
    """Title, command, time, backbone and hardware, then the runs left out and the notes."""
    hw, backbone = result["hardware"], result.get("backbone", {})
    partial = "" if result.get("finished") else " (in progress or interrupted: partial results)"
    sha, gpu = str(backbone.get("sha256"))[:12], f", GPU {hw['gpu']}" if hw.get("gpu") else ""
    versions = f"torch {hw.get('torch')}, transformers {hw.get('transformers')}"
    lines = [f"# moecl benchmark: preset `{result['preset']}`", "", result["config"].get("description", "")]
    lines += ["", f"- command: `{result['command']}`", f"- started: {result['started']}"]
    lines += [f"- wall time: {_fmt(result.get('wall_seconds'), 1)} s{partial}"]
    lines += [f"- backbone: {backbone.get('name')} ({backbone.get('dtype', '?')}, sha256 {sha})"]
    lines += [f"- hardware: {hw.get('cpu')}, {hw.get('torch_threads')} torch threads{gpu}; {versions}", ""]
    if result.get("not_run"):
        skipped = ", ".join(f"{r['method']}/{r['mode']}/{r['order']}/s{r['seed']}" for r in result["not_run"])
        lines += [f"> Not run ({result['not_run'][0]['why']}): {skipped}", ""]
    notes = result.get("notes", [])
    return lines + [f"> {note}" for note in notes] + ([""] if notes else [])


def _accuracy(result: dict) -> list[str]:
    """Per mode: each row's figures over its runs, each run's ACC where rows have several, the figure."""
    summary = result.get("summary", {})
    title = "Accuracy (ACC), backward transfer (BWT), forward transfer (FWT)"
    lines = _section(title, "accuracy") if summary else []
    for mode, rows in summary.items():
        header = ["method", "ACC", "ACC s.e.", "BWT", "FWT", "runs"]
        lines += _table(header, [_summary_row(m, s) for m, s in rows.items()], f"### {mode} mode")
        lines += _acc_by_run(result.get("runs", []), mode, rows)
        if result.get("finished"):
            lines += [f"![ACC and BWT of each row]({result['name']}-{mode}.png)", ""]
    return lines


def _summary_row(method: str, s: dict) -> list:
    runs = ", ".join(s.get("runs") or s["orders"])
    return [label(method), _pm(s["acc"]), s.get("acc_se"), _pm(s["bwt"]), _pm(s["fwt"]), runs]


def _acc_by_run(runs: list[dict], mode: str, rows: dict) -> list[str]:
    """Where a row has several runs: each run's ACC in its own column (order/seed); the joint row's run stands
    in every column of its seed."""
    runs = [r for r in runs if r["mode"] == mode]
    columns = sorted({metrics.run_label(r) for r in runs if r["order"] != "joint"})
    if len(columns) < 2 or not any(len(s["runs"]) > 1 for s in rows.values()):
        return []
    acc = {}
    for r in runs:
        seed = f"/s{metrics.run_seed(r)}"
        for column in columns:
            if metrics.run_label(r) == column or (r["order"] == "joint" and column.endswith(seed)):
                acc[r["method"], column] = r["acc"]
    cells = [[label(m)] + [acc.get((m, column)) for column in columns] for m in rows]
    return ["ACC of each run:", ""] + _table(["method"] + columns, cells)


def _instrument(mode: str, check: dict) -> str:
    """ACC(mtl) - ACC(seq_lora) in paired standard errors: at 3 or more the benchmark resolves such a gap."""
    ratio, over = check["ratio"], check.get("over_runs") or {"n": 0}
    resolved = ratio and ratio >= 3
    verdict = "the benchmark resolves" if resolved else "under 3: the benchmark cannot be trusted to resolve"
    line = f"Instrument ({mode} mode): mtl − seq_lora = {check['diff']:+.3f} at {_fmt(ratio, 1)} paired standard "
    line += f"errors ({verdict} a gap of that size)"
    if over["n"] > 1:
        line += f"; mean over the runs {_over_runs(over)} (s.e. test; s.e. between runs)"
    return line


def _paired(reference: str, by_mode: dict) -> list[str]:
    """The reference row against every other, record by record: a table per mode."""
    lines = _section(f"{label(reference)} against each row, record by record", "paired")
    for mode, others in by_mode.items():
        header = ["vs", "diff", "paired s.e.", "diff / s.e.", "ref only", "other only", "records"]
        cells = [_paired_row(other, c) for other, c in others.items()]
        if any(len(c["by_run"]) > 1 for c in others.values()):  # each pair of runs alone: diff (s.e.)
            header += ["by run", "mean of the runs (s.e. test; s.e. between runs)"]
            for row, c in zip(cells, others.values()):
                by_run = "; ".join(f"{o} {d['diff']:+.3f} ({d['se']:.3f})" for o, d in c["by_run"].items())
                row += [by_run, _over_runs(c["over_runs"])]
        lines += _table(header, cells, f"### {mode} mode")
    return lines


def _paired_row(other: str, c: dict) -> list:
    ratio = _fmt(c["diff"]["mean"] / c["se"], 1) if c["se"] else "–"
    return [label(other), _pm(c["diff"]), c["se"], ratio, c["reference_only"], c["other_only"], c["records"]]


def _run_title(run: dict) -> str:
    return f"{label(run['method'])} · {run['mode']} · {metrics.run_label(run)}"


def _gate(routed: list[dict]) -> list[str]:
    """Each gated run's final routing: per task, the weight on the task's own expert."""
    if not routed:
        return []
    tasks = list(dict.fromkeys(t for r in routed for t in r["routing"]))
    shares = [[format_share(r["routing"][t]) if t in r["routing"] else "–" for t in tasks] for r in routed]
    cells = [[_run_title(r), *row] for r, row in zip(routed, shares)]
    title = "The gate: weight on each task's own expert in the final model"
    return _section(title, "gate") + _table(["run"] + tasks, cells)


def _matrices(runs: list[dict]) -> list[str]:
    """Each run's figures and accuracy matrix, with R[i-1][i] (`before`) and b_i (`b`) where measured."""
    lines = _section("Accuracy matrices", "matrices") if runs else []
    for run in runs:
        m, order = run["metrics"], run["metrics"]["order"]
        figures = f"ACC {_fmt(run['acc'])}, BWT {_fmt(run['bwt'])}, FWT {_fmt(run['fwt'])}"
        lines += [f"**{_run_title(run)}** — {figures}, {_fmt(run['seconds'], 0)} s", ""]
        steps = ["joint"] if run["order"] == "joint" else m["steps"]
        rows = [[step] + row for step, row in zip(steps, m["matrix"])]
        for name, key in (("before", "before_training"), ("b", "zero_shot")):
            rows += [[name] + [m[key].get(t) for t in order]] if m.get(key) else []
        lines += _table(["after"] + order, rows)
    return lines


def _cost(cost: dict) -> list[str]:
    """Per mode, each method's step time, latency and memory with their ratios; step time against task count."""
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


def _reused(result: dict) -> list[str]:
    runs = result.get("runs", [])
    reused = sum(1 for r in runs if r.get("reused"))
    if not reused:
        return []
    where = result["selected"].get("runs_dir")
    stored = f"{reused} of {len(runs)} runs were read back from their stored files ({where}), "
    return [stored + "run in earlier invocations with the same settings.", ""]
