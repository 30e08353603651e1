"""`moecl` command line. Each command group lives in moecl/commands/<group>.py and registers itself.

`--params FILE` and `-S/--set SECTION.KEY=VALUE` are defined once, here, and accepted at every level: before
the command (`moecl -S train.epochs=1 step ...`), after it (`moecl step -S train.epochs=1 ...`), and after a
nested action (`moecl data validate -S data.root=x`). Every parser the command modules create is a
MoeclParser (argparse makes subparsers of the parent's class), and each adds the two options to itself.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import pkgutil
import sys

import moecl.commands

DEFAULT_PARAMS = "params.yaml"
# Below the top level each parser stores into its own attribute: argparse copies a subcommand's namespace over
# its parent's, so a shared attribute would let `-S` after the command erase the `-S` given before it.
_LEVEL_PARAMS = "_moecl_params_at_"
_LEVEL_OVERRIDES = "_moecl_overrides_at_"
_created = itertools.count()  # a parser is created after its parent: creation order is command-line order


class MoeclParser(argparse.ArgumentParser):
    def __init__(self, *args, top: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._moecl_top = top
        level = next(_created)
        group = self.add_argument_group("params (before or after the command)")
        group.add_argument(
            "--params",
            dest="params" if top else f"{_LEVEL_PARAMS}{level}",
            default=DEFAULT_PARAMS if top else argparse.SUPPRESS,
            metavar="FILE",
            help=f"params file (default: {DEFAULT_PARAMS})",
        )
        group.add_argument(
            "-S",
            "--set",
            dest="overrides" if top else f"{_LEVEL_OVERRIDES}{level}",
            action="append",
            default=[] if top else argparse.SUPPRESS,
            metavar="SECTION.KEY=VALUE",
            help="override a params value (repeatable), e.g. -S train.epochs=1",
        )

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if self._moecl_top:
            _merge_levels(namespace)
        return namespace, extras


def _merge_levels(namespace: argparse.Namespace) -> None:
    """One `params` (the last given) and one `overrides` list (in command-line order) from every level."""
    found = []
    for key in list(vars(namespace)):
        for prefix in (_LEVEL_PARAMS, _LEVEL_OVERRIDES):
            if key.startswith(prefix):
                found.append((int(key[len(prefix) :]), prefix, getattr(namespace, key)))
                delattr(namespace, key)
    overrides = list(namespace.overrides or [])
    for _level, prefix, value in sorted(found, key=lambda item: item[0]):
        if prefix == _LEVEL_PARAMS:
            namespace.params = value
        else:
            overrides += value
    namespace.overrides = overrides


def build_parser() -> argparse.ArgumentParser:
    parser = MoeclParser(
        prog="moecl",
        description="Self-evolving LLMs with MoE-CL: train, evaluate, gate and promote experts.",
        top=True,
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
