"""python -m bench.run --preset smoke|cpu|cpu-small|cpu-full|gpu [--methods ...] [--ablation] [--split dev]

Runs the cost micro-benchmarks, then every selected row ("method": a variant, bench/variants.py) in every
selected mode, task order and seed, and writes bench/results/<name>.json and .md. Each finished run is also
kept in its own file (bench/results/runs/<preset>[-dev]/, bench/store.py): a rerun with the same settings
reuses it, so a long benchmark is built over several sessions, and the results files aggregate every run
there is. <name> is the preset's name (<preset>-ablation with --ablation, <preset>-dev with --split dev), or
<preset>-slice when a flag resizes the preset (so a quick slice never overwrites a full result), or --name.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from bench.plan import describe_plan, plan_runs
from bench.presets import METHODS, SYNTHETIC_TASKS, get_preset, resized

RESULTS = Path(__file__).resolve().parent / "results"


def _list(values: list[str] | None) -> list[str] | None:
    """Accept both `--methods a b` and `--methods a,b`."""
    if not values:
        return None
    return [v for item in values for v in item.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", default="smoke", help="smoke | cpu | cpu-full | gpu (default smoke)")
    ap.add_argument(
        "--methods",
        nargs="+",
        help=f"rows to run (default the preset's: {' '.join(METHODS)}); any variant name, e.g. "
        "moecl_paper+gate_bias (bench/variants.py)",
    )
    ap.add_argument("--ablation", action="store_true", help="the preset's ablation rows (one knob each)")
    ap.add_argument("--seeds", nargs="+", type=int, help="training seeds (default the preset's, + its extra)")
    ap.add_argument(
        "--split",
        choices=("test", "dev"),
        default="test",
        help="score on the test split, or on a dev split drawn from the training data (choose settings there)",
    )
    ap.add_argument("--rerun", action="store_true", help="run again even where a stored run matches")
    ap.add_argument("--modes", nargs="+", help="subset of: classifier instruction")
    ap.add_argument("--orders", nargs="+", help="subset of the preset's orders (order1 order2 order3)")
    ap.add_argument(
        "--tasks", nargs="+", help="keep only these tasks of each order (in the order's sequence)"
    )
    ap.add_argument("--per-class", type=int, help="training examples per class (every mode)")
    ap.add_argument("--test-per-task", type=int, help="test records per task (every mode)")
    ap.add_argument("--epochs", type=int, help="epochs per task (every mode)")
    ap.add_argument("--max-length", type=int, help="tokens per training / test prompt (every mode)")
    ap.add_argument("--no-cost", action="store_true", help="skip the cost micro-benchmarks")
    ap.add_argument("--cost-only", action="store_true", help="only the cost micro-benchmarks")
    ap.add_argument("--out", default=str(RESULTS), help="results folder (default bench/results)")
    ap.add_argument("--name", help="results file stem (default: the preset, or <preset>-slice)")
    ap.add_argument("--runs-dir", help="where each run's own file goes (default <out>/runs/<preset>)")
    ap.add_argument("--data", help="the mtl5 folder (default $MOECL_MTL5, then ../shared/data/mtl5)")
    ap.add_argument("--base-dir", help="a local Hugging Face model folder instead of params.yaml `model:`")
    ap.add_argument("--params", default="params.yaml", help="where `model:` comes from (default params.yaml)")
    ap.add_argument("--workdir", help="where the runs' banks go (default: a temporary folder, removed)")
    ap.add_argument("--keep-banks", action="store_true", help="keep every bank (with --workdir)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: the preset's)")
    ap.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="where everything runs (default: the preset's); cpu hides the GPUs (CUDA_VISIBLE_DEVICES=)",
    )
    ap.add_argument(
        "--budget-minutes",
        type=float,
        help="start no new run after this many minutes (the rest are listed as not run)",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--dry-run", action="store_true", help="print the work each run does, then stop")
    return ap.parse_args(argv)


def _select(requested: list[str] | None, available, what: str) -> list[str]:
    if not requested:
        return list(available)
    unknown = [r for r in requested if r not in available]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (choose from {', '.join(available)})")
    return [a for a in available if a in requested]


def _load_tasks(preset, modes: list[str], orders: dict, data: str | None, split: str = "test") -> dict:
    """mode -> task_id -> TaskData (sizes differ by mode); split "dev": the test records are drawn from the
    training data the run does not train on."""
    from bench.tasks import find_mtl5, load_mtl5, synthetic_tasks

    names = sorted({t for order in orders.values() for t in order})
    out = {}
    for mode in modes:
        size = preset.modes[mode]
        if preset.data == "synthetic":
            out[mode] = synthetic_tasks(
                {n: SYNTHETIC_TASKS[n] for n in names}, size.per_class, size.test_per_task, preset.seed, split
            )
        else:
            out[mode] = load_mtl5(
                find_mtl5(data), names, size.per_class, size.test_per_task, preset.seed, split
            )
    return out


def _base(preset, args, tasks_by_mode: dict):
    from bench.backbones import params_base, tiny_base
    from bench.params import model_config

    if preset.backbone == "tiny":
        corpus = [r.text for tasks in tasks_by_mode.values() for t in tasks.values() for r in t.train]
        corpus += [
            t.instruction + " " + " ".join(t.labels)
            for tasks in tasks_by_mode.values()
            for t in tasks.values()
        ]
        return tiny_base(corpus, seed=preset.seed), None
    model_cfg = model_config(preset, args.params, args.base_dir)
    return params_base(model_cfg, preset.device), model_cfg


def main(argv: list[str] | None = None) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)  # presets set their own: give the caller (pytest) its own back


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    started_wall = time.perf_counter()
    preset = resized(
        get_preset(args.preset),
        per_class=args.per_class,
        test_per_task=args.test_per_task,
        epochs=args.epochs,
        max_length=args.max_length,
    )
    if args.device:
        preset = dataclasses.replace(preset, device=args.device)
        if args.device == "cpu":  # the library trains on the GPU when it sees one: let it see none
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from bench.variants import parse_variant

    methods = _list(args.methods) or list(preset.ablation if args.ablation else preset.methods)
    for method in methods:
        parse_variant(method)  # an unknown row stops here, before anything is loaded
    modes = _select(_list(args.modes), list(preset.modes), "modes")
    order_names = _select(_list(args.orders), list(preset.orders), "orders")
    orders = {name: preset.orders[name] for name in order_names}
    if args.tasks:
        known = sorted({t for order in orders.values() for t in order})
        kept = _select(_list(args.tasks), known, "tasks")
        orders = {name: [t for t in order if t in kept] for name, order in orders.items()}
    resized_run = any([args.tasks, args.per_class, args.test_per_task, args.epochs, args.max_length])
    stem = preset.name + ("-dev" if args.split == "dev" else "")
    default_name = stem + ("-ablation" if args.ablation else "")
    name = args.name or (f"{stem}-slice" if resized_run or args.cost_only else default_name)
    runs_dir = Path(args.runs_dir or Path(args.out) / "runs" / (name if resized_run else stem))

    import torch

    threads = args.threads if args.threads is not None else preset.threads
    if threads:
        torch.set_num_threads(threads)
        preset = _with_threads(preset, threads)
    from bench.tasks import DataMissing, data_summary

    try:
        tasks_by_mode = _load_tasks(preset, modes, orders, args.data, args.split)
    except DataMissing as exc:
        print(f"SKIPPED: {exc}", file=sys.stderr)
        return 0
    if args.dry_run:
        print(describe_plan(preset, methods, modes, orders, tasks_by_mode, cost=not args.no_cost))
        return 0
    if preset.device == "cuda" and not torch.cuda.is_available():
        print(f"preset {preset.name!r} needs a CUDA GPU and torch sees none", file=sys.stderr)
        return 2

    from bench.backbones import describe
    from bench.report import (
        hardware,
        instrument_check,
        paired_comparisons,
        summarise,
        write_results,
        zero_shot_table,
    )

    base, model_cfg = _base(preset, args, tasks_by_mode)
    result = {
        "preset": preset.name,
        "name": name,
        "config": preset.as_dict(),
        "selected": {
            "methods": methods,
            "modes": modes,
            "orders": order_names,
            "orders_run": orders,
            "split": args.split,
            "runs_dir": _relative(runs_dir),
        },
        "command": "python -m bench.run " + " ".join(shlex.quote(a) for a in argv),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(),
        "backbone": describe(base),
        "data": {mode: data_summary(tasks) for mode, tasks in tasks_by_mode.items()},
        "notes": [],
        "runs": [],
        "summary": {},
        "paired": {},
        "zero_shot": {},
        "cost": None,
        "errors": [],
        "not_run": [],
        "finished": False,
    }
    out_dir = Path(args.out)

    def save():
        result["wall_seconds"] = round(time.perf_counter() - started_wall, 1)
        result["summary"] = summarise(result["runs"], result["data"], methods)
        result["paired"] = paired_comparisons(result["runs"], methods)
        result["instrument"] = instrument_check(result["runs"])
        result["zero_shot"] = zero_shot_table(result["runs"])
        return write_results(out_dir, name, result)

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="moecl-bench-"))
    progress = not args.quiet
    inner_progress = progress and preset.backbone != "tiny"
    deadline = started_wall + 60 * args.budget_minutes if args.budget_minutes is not None else None
    try:
        if not args.no_cost:  # first: minutes at most, and a time budget should not cut it
            from bench.cost import run_costs

            torch.manual_seed(preset.seed)
            try:
                result["cost"] = run_costs(
                    base,
                    preset,
                    methods,
                    log=_logger(progress),
                    checkpoint=lambda partial: _keep(result, partial, save),
                )
            except Exception as exc:  # noqa: BLE001 - a failed micro-benchmark must not stop the accuracy runs
                result["errors"].append(
                    {"what": "cost", "error": repr(exc), "traceback": traceback.format_exc()}
                )
            save()
        if not args.cost_only:
            _run_accuracy(
                preset,
                plan_runs(methods, modes, list(orders), _seeds(preset, methods, args.seeds)),
                orders,
                tasks_by_mode,
                base,
                model_cfg,
                workdir,
                result,
                save,
                progress,
                inner_progress,
                args.keep_banks,
                deadline,
                runs_dir=runs_dir,
                rerun=args.rerun,
            )
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    result["finished"] = True
    json_path, md_path = save()
    print(f"wrote {json_path} and {md_path} in {result['wall_seconds']:.1f} s")
    for err in result["errors"]:
        print(f"ERROR in {err['what']}: {err['error']}", file=sys.stderr)
    return 1 if result["errors"] else 0


def _keep(result: dict, partial_cost: dict, save) -> None:
    result["cost"] = partial_cost
    save()


def _with_threads(preset, threads: int):
    return dataclasses.replace(preset, threads=threads)


def _logger(progress: bool):
    from tqdm.auto import tqdm

    return (lambda msg: tqdm.write(msg, file=sys.stderr)) if progress else (lambda msg: None)


def _seeds(preset, methods: list[str], requested: list[int] | None) -> dict[str, list[int]]:
    """Training seeds per row: --seeds for all, else the preset's seed plus its extra seeds for that row."""
    if requested:
        return {m: list(requested) for m in methods}
    return {m: [preset.seed, *preset.extra_seeds.get(m, ())] for m in methods}


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(RESULTS.parent.parent))
    except ValueError:
        return str(path)


def _run_accuracy(
    preset,
    plan,
    orders,
    tasks_by_mode,
    base,
    model_cfg,
    workdir,
    result,
    save,
    progress,
    inner_progress,
    keep_banks,
    deadline=None,
    *,
    runs_dir: Path,
    rerun: bool = False,
) -> None:
    from tqdm.auto import tqdm

    from bench.continual import run_continual
    from bench.joint import run_joint
    from bench.params import method_params
    from bench.store import load_run, run_key, run_path, save_run
    from bench.variants import parse_variant

    zero_shot = {mode: {} for mode in {mode for mode, *_ in plan}}
    bar = tqdm(plan, desc=f"bench {preset.name}", disable=not progress, file=sys.stderr)
    for mode, order, method, seed in bar:
        variant = parse_variant(method)
        order_name = order or "joint"
        order_tasks = sorted(tasks_by_mode[mode]) if order is None else orders[order]
        params = method_params(preset, method, mode, model_cfg, seed)
        data = {t: tasks_by_mode[mode][t].content_hash() for t in order_tasks}
        key = run_key(params.to_dict(), order_tasks, data, base.sha256, preset.device)
        path = run_path(runs_dir, variant.file_stem, mode, order_name, seed)
        stored = None if rerun else load_run(path, key)
        if stored is not None:
            stored["reused"] = True
            result["runs"].append(stored)
            _seed_zero_shot(zero_shot[mode], stored)
            save()
            continue
        bar.set_postfix_str(f"{method} {mode} {order_name} s{seed}")
        if deadline is not None and time.perf_counter() > deadline:
            result["not_run"].append(
                {
                    "method": method,
                    "mode": mode,
                    "order": order_name,
                    "seed": seed,
                    "why": "time budget (--budget-minutes) spent",
                }
            )
            continue
        try:
            if variant.joint:
                run = run_joint(
                    preset,
                    mode,
                    tasks_by_mode[mode],
                    base,
                    model_cfg=model_cfg,
                    zero_shot=zero_shot[mode] if mode == "instruction" else None,
                    progress=inner_progress,
                    seed=seed,
                )
            else:
                run = run_continual(
                    preset,
                    method,
                    mode,
                    order,
                    orders[order],
                    tasks_by_mode[mode],
                    base,
                    workdir,
                    model_cfg=model_cfg,
                    zero_shot_cache=zero_shot[mode],
                    keep_banks=keep_banks,
                    progress=inner_progress,
                    seed=seed,
                )
        except Exception as exc:  # noqa: BLE001 - record it, carry on with the other runs
            result["errors"].append(
                {
                    "what": f"{method} {mode} {order_name} s{seed}",
                    "error": repr(exc),
                    "traceback": traceback.format_exc(),
                }
            )
            continue
        finished = run.as_dict()
        save_run(
            path,
            key,
            finished,
            {
                "params": params.to_dict(),
                "data": data,
                "base": base.sha256,
                "hardware": result["hardware"],
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        )
        result["runs"].append(finished)
        tqdm.write(
            f"{method:14s} {mode:11s} {order_name:7s} s{seed} ACC {_f(run.metrics['acc'])} "
            f"BWT {_f(run.metrics['bwt'])} FWT {_f(run.metrics['fwt'])}  {run.seconds:.0f}s",
            file=sys.stderr,
        ) if progress else None
        save()
    bar.close()


def _seed_zero_shot(cache: dict, run: dict) -> None:
    """A reused instruction-mode run's b_i serve the runs still to come (the untrained model is the same)."""
    if run.get("mode") == "instruction":
        for task, value in (run["metrics"].get("zero_shot") or {}).items():
            cache.setdefault(task, value)


def _f(value) -> str:
    return "  -  " if value is None else f"{value:+.3f}" if value < 0 else f"{value:.3f}"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
