"""`moecl step`, `moecl eval`, `moecl predict`: the core library as commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _params(args):
    from moecl.config import load_params

    return load_params(args.params, args.overrides)


def resolve_bank(params, bank: str | None, command: str = "eval", task_id: str | None = None) -> Path:
    """The bank given on the command line, else the registry's champion, else the newest bank `moecl step`
    wrote (moecl.step_line.default_bank); says on stderr which one it took when it was not given."""
    if bank:
        return Path(bank)
    from moecl.step_line import default_bank

    choice = default_bank(params, task_id)
    print(f"{command}: {choice.why}", file=sys.stderr)
    return choice.bank


def load_tasks(params, task_ids) -> dict:
    """Validated task data for each id, from params data.root."""
    from moecl.data.validate import load_task
    from moecl.errors import UnknownTaskError

    root = Path(params.data.root)
    tasks = {}
    for task_id in task_ids:
        folder = root / task_id
        if not folder.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise UnknownTaskError(
                f"no task folder {folder} (data.root is {root}; tasks there: {', '.join(present) or 'none'}): "
                "write one (docs/data.md) or import one with `moecl data import`, then `moecl data validate`"
            )
        tasks[task_id] = load_task(folder, params.data)
    return tasks


def _next_bank_dir(params, task_id: str) -> Path:
    root = Path(params.registry.banks_dir)
    n = (
        1 + sum(1 for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if root.is_dir()
        else 1
    )
    return root / f"{n:04d}-{task_id}"


def cmd_step(args) -> int:
    from moecl.bank import verify_bank
    from moecl.model.base import base_from_params
    from moecl.step_line import record_step, step_parent
    from moecl.train.launch import launch_step

    params = _params(args)
    parent = step_parent(params, bank=args.bank, new=args.new)
    print(f"step: {parent.why}", file=sys.stderr)
    # a corrupted parent is refused before anything is loaded
    known = verify_bank(parent.bank).task_ids if parent.bank else []
    # every task is validated before anything is loaded or written
    tasks = load_tasks(params, list(dict.fromkeys(known + [args.task])))
    task = tasks.pop(args.task)
    out = Path(args.out) if args.out else _next_bank_dir(params, args.task)
    base = base_from_params(params.model)
    result = launch_step(
        params,
        args.task,
        parent.bank,
        out,
        task=task,
        base=base,
        progress=not args.quiet,
        eval_tasks=tasks,
        replay_tasks=tasks if params.method.replay_per_task > 0 else None,  # the known tasks' folders
    )
    record_step(params, result.bank_dir, result.task_id, parent.bank)
    summary = {
        "bank": str(result.bank_dir),
        "parent": None if parent.bank is None else str(parent.bank),
        "task": result.task_id,
        "new_task": result.new_task,
        "losses": result.losses._asdict() if result.losses else None,
        "best_dev_accuracy": result.best_dev_accuracy,
        "before_training": result.before_training,
        "zero_shot": result.zero_shot,
        "seconds": round(result.seconds, 2),
    }
    print(json.dumps(summary, indent=2))
    return 0


def format_matrix(metrics: dict) -> str:
    order, steps = metrics["order"], metrics.get("steps", metrics["order"])
    width = max([len(t) for t in order] + [12])
    lines = ["after step".ljust(width + 4) + "".join(t[:10].rjust(11) for t in order)]
    for i, row in enumerate(metrics["matrix"]):
        cells = "".join(("-" if v is None else f"{v:.3f}").rjust(11) for v in row)
        lines.append(f"{i + 1:>2}. {steps[i]}".ljust(width + 4) + cells)
    acc, bwt, fwt = (metrics[k] for k in ("acc", "bwt", "fwt"))
    lines.append(
        "ACC "
        + ("n/a" if acc is None else f"{acc:.3f}")
        + "   BWT "
        + ("n/a" if bwt is None else f"{bwt:+.3f}")
        + "   FWT "
        + ("n/a" if fwt is None else f"{fwt:+.3f}")
    )
    return "\n".join(lines)


def cmd_eval(args) -> int:
    from moecl.bank import verify_bank
    from moecl.evaluate import evaluate_bank
    from moecl.model.base import base_from_params

    params = _params(args)
    bank = resolve_bank(params, args.bank, "eval")
    manifest = verify_bank(bank)  # a corrupted bank is refused before anything is loaded
    tasks = load_tasks(params, manifest.task_ids)
    base = base_from_params(params.model)  # resolved and hashed once: the routing reuses it
    evaluation = evaluate_bank(bank, base, tasks, params, progress=not args.quiet)
    record = evaluation.record  # as evaluation.json holds it: the command prints and writes what is stored
    routing = None
    if args.routing:  # over the same test records the evaluation scored
        from moecl.routing import bank_routing
        from moecl.sampling import stratified_sample

        sample = params.evaluate.max_test_examples, params.train.seed
        texts = {t: [r.text for r in stratified_sample(tasks[t].test, *sample)] for t in manifest.task_ids}
        routing = bank_routing(bank, base, texts, params.train.max_length)
    if args.out:
        from moecl.io import write_json_atomic

        write_json_atomic(args.out, record["metrics"])
    if args.json:
        print(json.dumps(record | ({"routing": routing} if args.routing else {}), indent=2))
        return 0
    print(format_matrix(record["metrics"]))
    for task_id, rate in evaluation.stripping_rate.items():
        print(f"stripping rate {task_id}: {rate:.3f} (precision >= {params.evaluate.stripping_precision})")
    if routing is not None:
        from moecl.routing import format_share

        print(
            "gate weight on each task's own expert, mean over layers [lowest, highest] (0.5: untrained gate)"
        )
        for task_id, cell in routing.items():
            print(f"  {task_id}: {format_share(cell)}")
    elif args.routing:
        print("routing: this bank's method has no gate (only moecl mixes a shared and a dedicated expert)")
    return 0


def _read_texts(args) -> list[str]:
    if args.texts:
        return list(args.texts)
    from moecl.errors import MoeclError

    texts = []
    for n, line in enumerate(sys.stdin, start=1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise MoeclError(f'<stdin>:{n}: not valid JSON (expected {{"text": ...}} per line)') from None
        if isinstance(obj, str):
            texts.append(obj)
        elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
            texts.append(obj["text"])
        else:
            raise MoeclError(f"<stdin>:{n}: text: expected a string field 'text'")
    return texts


def _unknown_task_hint(params, task_id: str) -> str:
    """A next step for a task the bank does not know: promote its registered version, or train it."""
    from moecl.registry import Registry

    registry = Registry.from_params(params)
    versions = [r for r in registry.list_versions() if r.task_id == task_id]
    if versions:
        newest = versions[-1]
        if newest.status == "rejected":
            why = "; ".join((newest.gate or {}).get("reasons") or []) or "see its record"
            return (
                f"its newest version {newest.version} was rejected ({why}): `moecl registry show "
                f"{newest.version}` has the details, `moecl promote {newest.version}` makes it the champion anyway"
            )
        return (
            f"its newest version {newest.version} is {newest.status}: "
            f"`moecl promote {newest.version}` makes it the champion, or pass --bank DIR"
        )
    if (Path(params.data.root) / task_id).is_dir():
        return (
            f"train it: `dvc repro` then `python -m moecl.stages promote`, or `moecl step --task {task_id}`"
        )
    return (
        f"there is no task folder {Path(params.data.root) / task_id} either (README: your own task, by hand)"
    )


def cmd_predict(args) -> int:
    from moecl.bank import load_bank, verify_bank
    from moecl.errors import MoeclError, UnknownTaskError
    from moecl.model.base import base_from_params, preferred_device
    from moecl.model.inference import predict

    params = _params(args)
    bank = resolve_bank(params, args.bank, "predict", args.task)
    known = verify_bank(bank).task_ids  # a corrupted bank is refused here
    if args.task not in known:  # checked before the model is loaded
        raise UnknownTaskError(
            f"unknown task {args.task!r}: the bank {bank} knows {', '.join(known) or 'none'}; "
            + _unknown_task_hint(params, args.task)
        )
    texts = _read_texts(args)
    if not texts:
        raise MoeclError("no texts: pass them as arguments or as JSON lines on stdin")
    loaded = load_bank(bank, base_from_params(params.model), device=preferred_device())
    preds = predict(
        loaded.model,
        loaded.tokenizer,
        args.task,
        texts,
        max_length=params.train.max_length,
        batch_size=params.evaluate.batch_size,
        instruction_eval=params.evaluate.instruction_eval,
        max_new_tokens=params.evaluate.max_new_tokens,
        with_scores=True,
    )
    for text, p in zip(texts, preds):
        print(json.dumps({"text": text[:80], **p.as_dict()}, ensure_ascii=False))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("step", help="train one continual-learning step on a task into a new bank")
    p.add_argument("--task", required=True, help="task id (a folder under params data.root)")
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--bank",
        help="parent bank to start from (default: the newest bank `moecl step` wrote, else the champion)",
    )
    start.add_argument("--new", action="store_true", help="start a new bank, from no parent")
    p.add_argument("--out", help="new bank directory (default: <registry.banks_dir>/<n>-<task>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_step)

    p = sub.add_parser("eval", help="evaluate a bank on every task it knows: the matrix, ACC, BWT, FWT")
    p.add_argument(
        "--bank", help="bank directory (default: the champion, else the newest bank `moecl step` wrote)"
    )
    p.add_argument("--out", help="also write the metrics JSON here")
    p.add_argument("--json", action="store_true", help="print the full evaluation record as JSON")
    p.add_argument("--routing", action="store_true", help="also the gate's weight on each task's own expert")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("predict", help="predict labels for texts (arguments, or JSON lines on stdin)")
    p.add_argument("--task", required=True, help="task id known to the bank")
    p.add_argument(
        "--bank", help="bank directory (default: the champion, else the newest bank `moecl step` wrote)"
    )
    p.add_argument("texts", nargs="*", help="texts to classify (default: read JSON lines from stdin)")
    p.set_defaults(handler=cmd_predict)
