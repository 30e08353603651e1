"""`moecl` command line. Each command group lives in moecl/commands/<group>.py and registers itself."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import moecl.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moecl", description="Self-evolving LLMs with MoE-CL: train, evaluate, gate and promote experts."
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a params value (repeatable), e.g. -S train.epochs=1",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(moecl.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"moecl.commands.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    from moecl.errors import MoeclError

    try:
        return int(args.handler(args) or 0)
    except MoeclError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
