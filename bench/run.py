"""python -m bench.run --preset smoke|cpu|cpu-small|cpu-full|gpu [--methods ...] [--ablation] [--split dev]

Runs the cost micro-benchmarks, then every selected row ("method": a variant, bench/params.py) in every
selected mode, task order and seed, and writes bench/results/<name>.json and .md. Each finished run is also
kept in its own file (bench/results/runs/<preset>[-dev]/, bench/runs.py): a rerun with the same settings
reuses it, so a long benchmark is built over several sessions, and the results files aggregate every run
there is (a run of a few rows or seeds reads back the stored runs of the preset's other rows and seeds too).
<name> is the preset's name (<preset>-ablation with --ablation, <preset>-dev with --split dev), or
<preset>-slice when a flag resizes the preset (so a quick slice never overwrites a full result), or --name.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from bench.params import (
    METHODS,
    file_stem,
    get_preset,
    is_joint,
    method_params,
    model_config,
    parse_variant,
    resized,
)
from moecl.io import environment
from moecl.model.base import BaseSpec

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = ap.add_argument
    add("--preset", default="smoke", help="smoke | cpu | cpu-small | cpu-full | gpu (default smoke)")
    rows = f"rows to run (default the preset's: {' '.join(METHODS)}); any variant name, e.g. moecl_paper+gate_bias"
    add("--methods", nargs="+", help=rows + " (bench/params.py)")
    add("--ablation", action="store_true", help="the preset's ablation rows (one knob each)")
    add("--seeds", nargs="+", type=int, help="training seeds (default the preset's, + its extra)")
    dev = "score on the test split, or on a dev split drawn from the training data (choose settings there)"
    add("--split", choices=("test", "dev"), default="test", help=dev)
    add("--rerun", action="store_true", help="run again even where a stored run matches")
    add("--modes", nargs="+", help="subset of: classifier instruction")
    add("--orders", nargs="+", help="subset of the preset's orders (order1 order2 order3)")
    add("--tasks", nargs="+", help="keep only these tasks of each order (in the order's sequence)")
    add("--per-class", type=int, help="training examples per class (every mode)")
    add("--test-per-task", type=int, help="test records per task (every mode)")
    add("--epochs", type=int, help="epochs per task (every mode)")
    add("--max-length", type=int, help="tokens per training / test prompt (every mode)")
    add("--no-cost", action="store_true", help="skip the cost micro-benchmarks")
    add("--cost-only", action="store_true", help="only the cost micro-benchmarks")
    add("--out", default=str(RESULTS), help="results folder (default bench/results)")
    add("--name", help="results file stem (default: the preset, or <preset>-slice)")
    add("--runs-dir", help="where each run's own file goes (default <out>/runs/<preset>)")
    add("--data", help="the mtl5 folder (default $MOECL_MTL5, then ../shared/data/mtl5)")
    add("--base-dir", help="a local Hugging Face model folder instead of params.yaml `model:`")
    add("--params", default="params.yaml", help="where `model:` comes from (default params.yaml)")
    add("--workdir", help="where the runs' banks go (default: a temporary folder, removed)")
    add("--keep-banks", action="store_true", help="keep every bank (with --workdir)")
    add("--threads", type=int, help="torch CPU threads (default: the preset's)")
    where = "where everything runs (default: the preset's); cpu hides the GPUs (CUDA_VISIBLE_DEVICES=)"
    add("--device", choices=("cpu", "cuda"), help=where)
    budget = "start no new run after this many minutes (the rest are listed as not run)"
    add("--budget-minutes", type=float, help=budget)
    add("--quiet", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def _list(values: list[str] | None) -> list[str] | None:
    """Accept both `--methods a b` and `--methods a,b`."""
    return [v for item in values for v in item.split(",") if v] if values else None


def _select(requested: list[str] | None, available, what: str) -> list[str]:
    unknown = [r for r in requested or [] if r not in available]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (choose from {', '.join(available)})")
    return [a for a in available if not requested or a in requested]


def backbone(preset: dict, tasks_by_mode: dict, params_file="params.yaml", base_dir=None) -> tuple:
    """(the base, its moecl ModelConfig, what was loaded): moecl.testing's tiny Llama with a tokenizer trained on the
    tasks' texts (ModelConfig None), or the project's backbone as params `model:` names it (moecl.model.base).
    The model is loaded once; each `base.load()` returns a fresh deep copy of it (moecl installs its layers in
    place, and loading the backbone each time would cost seconds, a GGUF much more)."""
    if preset["backbone"] == "tiny":
        from moecl.testing import tiny_base, tiny_tokenizer

        tasks = [t for by_id in tasks_by_mode.values() for t in by_id.values()]
        corpus = [r.text for t in tasks for r in t.train]
        tokenizer = tiny_tokenizer(corpus + [f"{t.instruction} {' '.join(t.labels)}" for t in tasks])
        spec = tiny_base(tokenizer, preset["seed"], "moecl.testing.tiny_llama")
        model_cfg, device = None, "cpu"
    else:
        from moecl.model.base import base_from_params

        model_cfg = model_config(preset, params_file, base_dir)
        spec, device = base_from_params(model_cfg), preset["device"]
    started = time.perf_counter()
    model, tokenizer = spec.load()
    model.to(device).eval().requires_grad_(False)
    loaded = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    loaded |= {"layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size}
    loaded["load_seconds"] = round(time.perf_counter() - started, 2)
    return BaseSpec(spec.name, spec.sha256, lambda: (copy.deepcopy(model), tokenizer)), model_cfg, loaded


def plan_runs(methods, modes, orders, seeds: dict[str, list[int]]) -> list[tuple]:
    """(mode, order, method, seed): every row's first seed order by order, then the extra seeds, so that a run
    cut short loses repeats before it loses a row. The joint row (order-independent) runs once per mode and
    seed, with the first order (order None). `seeds`: row -> its training seeds."""
    plan = []
    for r in range(max((len(seeds[m]) for m in methods), default=1)):
        for k, order in enumerate(orders):
            for mode in modes:
                for m in methods:
                    if r < len(seeds[m]) and (k == 0 or not is_joint(m)):
                        plan.append((mode, None if is_joint(m) else order, m, seeds[m][r]))
    return plan


def main(argv: list[str] | None = None) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        return _main(parse_args(argv), sys.argv[1:] if argv is None else argv)
    finally:
        torch.set_num_threads(threads)  # presets set their own: give the caller (pytest) its own back


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from bench import report
    from bench.runs import Bench
    from bench.tasks import DataMissing, data_summary, load_tasks
    from moecl import metrics

    started_wall = time.perf_counter()
    preset, resized_run = _preset(args)
    # the preset's own rows (and seeds) join the tables from their stored runs, never run here, so that running
    # a few rows or seeds still writes the whole table
    rows = list(preset["ablation" if args.ablation else "methods"])
    methods = _list(args.methods) or list(rows)
    for method in methods:
        parse_variant(method)  # an unknown row stops here, before anything is loaded
    shown = [*rows, *(m for m in methods if m not in rows)]
    modes = _select(_list(args.modes), list(preset["modes"]), "modes")
    order_names, orders = _orders(args, preset)
    stem = preset["name"] + ("-dev" if args.split == "dev" else "")
    suffix = "-slice" if resized_run or args.cost_only else "-ablation" if args.ablation else ""
    name = args.name or stem + suffix
    runs_dir = Path(args.runs_dir or Path(args.out) / "runs" / (name if resized_run else stem))
    train = preset["params"].setdefault("train", {})
    threads = train.get("threads", 0) if args.threads is None else args.threads
    if threads:
        torch.set_num_threads(threads)
        train["threads"] = threads
    try:
        tasks_by_mode = load_tasks(preset, modes, orders, args.data, args.split)
    except DataMissing as exc:
        print(f"SKIPPED: {exc}", file=sys.stderr)
        return 0
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        print(f"preset {preset['name']!r} needs a CUDA GPU and torch sees none", file=sys.stderr)
        return 2

    base, model_cfg, loaded = backbone(preset, tasks_by_mode, args.params, args.base_dir)
    selected = {"methods": methods, "modes": modes, "orders": order_names, "orders_run": orders}
    result = {
        "preset": preset["name"],
        "name": name,
        "config": preset,
        "selected": selected | {"split": args.split, "runs_dir": _relative(runs_dir)},
        "command": "python -m bench.run " + " ".join(shlex.quote(a) for a in argv),
        "started": _now(),
        "hardware": environment(),
        "backbone": {"name": base.name, "sha256": base.sha256, **loaded},
        "data": {mode: data_summary(tasks) for mode, tasks in tasks_by_mode.items()},
    }
    result |= {"notes": [], "runs": [], "summary": {}, "paired": {}, "cost": None}
    result |= {"errors": [], "not_run": [], "finished": False}
    test_sizes = {mode: {t: d["test"] for t, d in tasks.items()} for mode, tasks in result["data"].items()}

    def save(cost: dict | None = None):
        if cost is not None:
            result["cost"] = cost
        result["wall_seconds"] = round(time.perf_counter() - started_wall, 1)
        result["summary"] = metrics.summarise_runs(result["runs"], test_sizes, shown)
        references = report.references(result["runs"], shown, args.ablation)
        result["paired"] = metrics.paired_comparisons(result["runs"], references, shown)
        result["instrument"] = metrics.instrument_check(result["runs"])
        return report.write_results(Path(args.out), name, result)

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="moecl-bench-"))
    # the tiny model's steps take no time to watch
    inner_progress = not args.quiet and preset["backbone"] != "tiny"
    bench = Bench(preset, base, model_cfg, tasks_by_mode, orders, workdir, args.keep_banks, inner_progress)
    deadline = started_wall + 60 * args.budget_minutes if args.budget_minutes is not None else None
    try:
        if not args.no_cost:  # first: minutes at most, and a time budget should not cut it
            from bench.cost import run_costs

            torch.manual_seed(preset["seed"])
            log = (lambda msg: None) if args.quiet else (lambda msg: tqdm.write(msg, file=sys.stderr))
            try:
                run_costs(base, preset, methods, log=log, checkpoint=save)
            except Exception as exc:  # noqa: BLE001 - a failed micro-benchmark must not stop the accuracy runs
                result["errors"].append(_error("cost", exc))
            save()
        if not args.cost_only:
            seeds = {m: list(args.seeds) for m in methods} if args.seeds else _preset_seeds(preset, methods)
            plan = plan_runs(methods, modes, list(orders), seeds)
            preset_plan = plan_runs(rows, modes, list(orders), _preset_seeds(preset, rows))
            stored_only = [run for run in preset_plan if run not in plan]
            _run_accuracy(bench, stored_only + plan, set(stored_only), result, save, runs_dir, args, deadline)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    result["finished"] = True
    json_path, md_path = save()
    print(f"wrote {json_path} and {md_path} in {result['wall_seconds']:.1f} s")
    for err in result["errors"]:
        print(f"ERROR in {err['what']}: {err['error']}", file=sys.stderr)
    return 1 if result["errors"] else 0


def _preset(args: argparse.Namespace) -> tuple[dict, bool]:
    """The preset resized by the CLI's size flags and moved to --device; and whether a flag resized it."""
    sizes = {k: getattr(args, k) for k in ("per_class", "test_per_task", "epochs", "max_length")}
    preset = resized(get_preset(args.preset), **sizes)
    if args.device:
        preset["device"] = args.device
        if args.device == "cpu":  # the library trains on the GPU when it sees one: let it see none
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return preset, any([args.tasks, *sizes.values()])


def _orders(args: argparse.Namespace, preset: dict) -> tuple[list[str], dict]:
    """The selected orders' names, and name -> its tasks (only those of --tasks, in the order's sequence)."""
    names = _select(_list(args.orders), list(preset["orders"]), "orders")
    orders = {name: preset["orders"][name] for name in names}
    if args.tasks:
        kept = _select(_list(args.tasks), sorted({t for order in orders.values() for t in order}), "tasks")
        orders = {name: [t for t in order if t in kept] for name, order in orders.items()}
    return names, orders


def _preset_seeds(preset: dict, methods: list[str]) -> dict[str, list[int]]:
    """row -> its training seeds: the preset's `seed`, then the row's `extra_seeds`."""
    return {m: [preset["seed"], *preset["extra_seeds"].get(m, ())] for m in methods}


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(RESULTS.parent.parent))
    except ValueError:
        return str(path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _error(what: str, exc: Exception) -> dict:
    return {"what": what, "error": repr(exc), "traceback": traceback.format_exc()}


def _run_accuracy(bench, plan, stored_only: set, result, save, runs_dir: Path, args, deadline) -> None:
    """Run (or read back) every run of `plan`; those in `stored_only` are read back where stored, else left out."""
    from bench.runs import load_run, run_key, run_one, run_path, save_run

    preset, base = bench.preset, bench.base
    bar = tqdm(plan, desc=f"bench {preset['name']}", disable=args.quiet, file=sys.stderr)
    for planned in bar:
        mode, order, method, seed = planned
        order_name, tasks = order or "joint", bench.tasks[mode]
        order_tasks = sorted(tasks) if order is None else bench.orders[order]
        params = method_params(preset, method, mode, bench.model_cfg, seed).to_dict()
        data = {t: tasks[t].content_hash() for t in order_tasks}
        key = run_key(params, order_tasks, data, base.sha256, preset["device"])
        path = run_path(runs_dir, file_stem(method), mode, order_name, seed)
        only_stored = planned in stored_only
        stored = None if args.rerun and not only_stored else load_run(path, key)
        if stored is not None:
            result["runs"].append(stored | {"reused": True})
            # in instruction mode its b_i serve the runs still to come (the untrained model is the same)
            if mode == "instruction":
                for task, value in (stored["metrics"].get("zero_shot") or {}).items():
                    bench.zero_shot.setdefault(task, value)
            save()
        if stored is not None or only_stored:
            continue
        what = f"{method} {mode} {order_name} s{seed}"
        bar.set_postfix_str(what)
        if deadline is not None and time.perf_counter() > deadline:
            skipped = {"method": method, "mode": mode, "order": order_name, "seed": seed}
            result["not_run"].append(skipped | {"why": "time budget (--budget-minutes) spent"})
            continue
        try:
            run = run_one(bench, method, mode, order, seed)
        except Exception as exc:  # noqa: BLE001 - record it, carry on with the other runs
            result["errors"].append(_error(what, exc))
            continue
        context = {"params": params, "data": data, "base": base.sha256, "hardware": result["hardware"]}
        save_run(path, key, run, context | {"finished": _now()})
        result["runs"].append(run)
        if not args.quiet:
            tqdm.write(_progress_line(run), file=sys.stderr)
        save()
    bar.close()


def _progress_line(run: dict) -> str:
    figures = " ".join(
        f"{k.upper()} {'-' if run[k] is None else format(run[k], '.3f')}" for k in ("acc", "bwt", "fwt")
    )
    return f"{run['method']:14s} {run['mode']:11s} {run['order']:7s} s{run['seed']} {figures}  {run['seconds']:.0f}s"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
