"""`moecl registry list|show|verify`, `moecl promote VERSION`, `moecl rollback`: the champion and its
challengers."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    reg = subparsers.add_parser("registry", help="list and inspect registered bank versions")
    reg_sub = reg.add_subparsers(dest="registry_command", metavar="SUBCOMMAND")
    reg.set_defaults(handler=lambda args: reg.print_help() or 2)

    ls = reg_sub.add_parser("list", help="every bank version with its status and metrics")
    ls.add_argument("--json", action="store_true", help="print the records as JSON")
    ls.set_defaults(handler=_list)

    show = reg_sub.add_parser("show", help="one version's full record and its events, as JSON")
    show.add_argument("version", help="e.g. v0003 (or 3)")
    show.set_defaults(handler=_show)

    verify = reg_sub.add_parser(
        "verify",
        help="check the registry: files, hashes, manifests, the champion pointer, the decision log",
        description="Lists every problem, one line each naming its file; exits 1 if there is any.",
    )
    verify.add_argument(
        "--all", action="store_true", help="hash every bank's files (default: the champion's only)"
    )
    verify.set_defaults(handler=_verify)

    promote = subparsers.add_parser("promote", help="make a registered bank version the champion")
    promote.add_argument("version", help="e.g. v0003 (or 3)")
    promote.add_argument("--reason", default="manual promotion", help="recorded in registry/events.jsonl")
    promote.set_defaults(handler=_promote)

    rollback = subparsers.add_parser("rollback", help="restore the previous champion")
    rollback.add_argument("--reason", default="manual rollback", help="recorded in registry/events.jsonl")
    rollback.set_defaults(handler=_rollback)


def _registry(args):
    from moecl.config import load_params
    from moecl.registry import Registry

    return Registry.from_params(load_params(args.params, args.overrides))


def _metric(metrics: dict, key: str) -> str:
    value = metrics.get(key, metrics.get(key.upper()))
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _list(args) -> int:
    import json

    registry = _registry(args)
    records = registry.list_versions()
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
        return 0
    if not records:
        print(f"no versions registered in {registry.root}")
        return 0
    champion = registry.champion()
    header = ("", "VERSION", "CREATED", "TASK", "DATA VERSION", "STATUS", "ACC", "BWT")
    rows = [header] + [
        (
            "*" if champion and r.version == champion.version else "",
            r.version,
            r.created_at.replace("+00:00", "Z"),
            r.task_id or "-",
            (r.data_version or "-")[:16],
            r.status,
            _metric(r.metrics, "acc"),
            _metric(r.metrics, "bwt"),
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _show(args) -> int:
    import json

    registry = _registry(args)
    record = registry.get(args.version)
    champion = registry.champion()
    out = {
        **record.to_dict(),
        "is_champion": bool(champion and champion.version == record.version),
        "events": registry.history_events(record.version),
    }
    print(json.dumps(out, indent=2))
    return 0


def _promote(args) -> int:
    record = _registry(args).promote(args.version, reason=args.reason)
    print(f"promoted {record.version} (bank {record.bank_dir})")
    return 0


def _rollback(args) -> int:
    record = _registry(args).rollback(reason=args.reason)
    print(f"rolled back: the champion is {record.version} again (bank {record.bank_dir})")
    return 0


def _verify(args) -> int:
    import sys

    from moecl.registry_verify import verify_registry

    registry = _registry(args)
    problems = verify_registry(registry, all_banks=args.all)
    for problem in problems:
        print(problem)
    champion = registry.champion_path
    scope = "every bank hashed" if args.all else "the champion's bank hashed; --all hashes every bank"
    if problems:
        print(f"{len(problems)} problem(s) in {registry.root} ({scope})", file=sys.stderr)
        return 1
    count = len(list(registry.versions_dir.glob("v*.json"))) if registry.versions_dir.is_dir() else 0
    state = "a champion" if champion.exists() else "no champion yet"
    print(f"{registry.root}: ok ({count} version(s), {state}; {scope})")
    return 0
