"""`moecl data validate | import | pull | demo`: check task folders, import sources, bring a DVC data version in
whole, write the demo stream."""

from __future__ import annotations

import argparse

SOURCES = ("benchmark", "jsonl", "csv", "hf")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data", help="validate task folders, import datasets, write the demo stream"
    )
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)

    val = sub.add_parser("validate", help="check task folders (default: every folder under data.root)")
    val.add_argument(
        "paths", nargs="*", metavar="PATH", help="task folders (default: all under params data.root)"
    )
    val.add_argument("--json", action="store_true", help="print the issues as JSON")
    val.set_defaults(handler=_validate)

    imp = sub.add_parser("import", help="import a dataset into a task folder (validated, atomic)")
    imp.add_argument("kind", choices=SOURCES, help="source kind")
    imp.add_argument(
        "src", metavar="SRC", help="benchmark folder, .jsonl/.csv file, or datasets folder/hub name"
    )
    imp.add_argument("--task-id", required=True, help="task id (the folder name): [a-z0-9][a-z0-9_-]{0,63}")
    imp.add_argument("--dest", default=None, help="data root to write into (default: params data.root)")
    imp.add_argument(
        "--labels", default=None, help="comma-separated labels in their order (default: the source's)"
    )
    imp.add_argument(
        "--instruction",
        default=None,
        help="instruction text (default: a CL-benchmark task's own, else generated from the labels)",
    )
    imp.add_argument("--description", default="", help="a short description of the task")
    imp.add_argument("--positive-label", default=None, help="the positive label of a binary compliance task")
    imp.add_argument("--per-class", type=int, default=0, help="train cap per class (0 = none)")
    imp.add_argument("--test-per-class", type=int, default=0, help="test cap per class (0 = none)")
    imp.add_argument("--train-size", type=int, default=0, help="train total cap, stratified (0 = none)")
    imp.add_argument("--test-size", type=int, default=0, help="test total cap, stratified (0 = none)")
    imp.add_argument(
        "--test-fraction", type=float, default=0.2, help="test share when the source has no test split"
    )
    imp.add_argument("--seed", type=int, default=42, help="sampling seed")
    imp.add_argument("--text-column", default="text", help="jsonl/csv/hf: the text column")
    imp.add_argument("--label-column", default="label", help="jsonl/csv/hf: the label column")
    imp.add_argument("--test-file", default=None, help="jsonl/csv: a separate test file (else split off)")
    imp.add_argument("--train-split", default="train", help="hf: the train split name")
    imp.add_argument("--test-split", default="test", help="hf: the test split name (if absent: split off)")
    imp.set_defaults(handler=_import)

    pull = sub.add_parser(
        "pull",
        help="fetch the data version a DVC file names; check it out only if the remote had all of it",
    )
    pull.add_argument(
        "--dvc-file", default="data.dvc", help="the DVC file that tracks the data (default: data.dvc)"
    )
    pull.add_argument(
        "--remote", default=None, help="DVC remote to fetch from (default: the project's default)"
    )
    pull.set_defaults(handler=_pull)

    demo = sub.add_parser("demo", help="write the embedded demo stream's landings (offline sources)")
    demo.add_argument("--dest", default=None, help="data root to write into (default: params data.root)")
    demo.add_argument("--upto", type=int, default=None, help="write the first N landings (default: all)")
    demo.add_argument("--cache", default=".cache", help="cache folder of the npm source (default: .cache)")
    demo.add_argument("--seed", type=int, default=13, help="sampling seed of the demo stream")
    demo.set_defaults(handler=_demo)


def _params(args: argparse.Namespace):
    from moecl.config import load_params

    return load_params(args.params, args.overrides)


def _validate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from moecl.data.validate import list_task_folders, validate_task_folder

    params = _params(args)
    folders = [Path(p) for p in args.paths] or list_task_folders(params.data.root)
    if not folders:
        print(f"no task folders under {params.data.root}")
        return 0
    report = {}
    for folder in folders:
        report[str(folder)] = validate_task_folder(folder, params.data)
    if args.json:
        print(json.dumps({k: [i.to_dict() for i in v] for k, v in report.items()}, indent=2))
    else:
        for folder, issues in report.items():
            for issue in issues:
                print(issue)
            if not issues:
                print(f"{folder}: ok")
    return 1 if any(report.values()) else 0


def _import(args: argparse.Namespace) -> int:
    from moecl.data import importers

    params = _params(args)
    dest = args.dest or params.data.root
    opts = importers.ImportOptions(
        task_id=args.task_id,
        labels=[x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None,
        instruction=args.instruction,
        description=args.description,
        positive_label=args.positive_label,
        per_class=args.per_class,
        test_per_class=args.test_per_class,
        train_size=args.train_size,
        test_size=args.test_size,
        test_fraction=args.test_fraction,
        seed=args.seed,
    )
    if args.kind == "benchmark":
        report = importers.import_benchmark(args.src, opts, dest, data_cfg=params.data)
    elif args.kind == "hf":
        report = importers.import_hf(
            args.src,
            opts,
            dest,
            text_column=args.text_column,
            label_column=args.label_column,
            train_split=args.train_split,
            test_split=args.test_split,
            data_cfg=params.data,
        )
    else:
        report = importers.import_table(
            args.src,
            opts,
            dest,
            text_column=args.text_column,
            label_column=args.label_column,
            test_path=args.test_file,
            fmt=args.kind,
            data_cfg=params.data,
        )
    print(report.summary())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from moecl.data.demo_stream import demo_landings

    params = _params(args)
    dest = args.dest or params.data.root
    landings = demo_landings(args.cache, seed=args.seed)
    upto = len(landings) if args.upto is None else max(0, min(args.upto, len(landings)))
    for i, landing in enumerate(landings[:upto], start=1):
        path = landing.write(dest, params.data)
        print(f"[{i}/{len(landings)}] {landing.task_id} {landing.version}: {landing.description} -> {path}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from moecl.data.remote import pull_data

    pulled = pull_data(_params(args), args.dvc_file, args.remote)
    print(f"data version {pulled.md5}: {pulled.files} file(s) in {pulled.path}")
    return 0
