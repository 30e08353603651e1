"""`moecl model pull`: resolve params model.name_or_path into a local Hugging Face folder."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("model", help="the frozen backbone")
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION")
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)
    pull = sub.add_parser(
        "pull", help="resolve model.name_or_path into model.local_dir (offline GGUF fallback)"
    )
    pull.set_defaults(handler=_pull)


def _pull(args: argparse.Namespace) -> int:
    import sys
    import time

    from moecl.backbone import backbone_hash, pull_backbone, read_source
    from moecl.config import load_params

    params = load_params(args.params, args.overrides)
    started = time.monotonic()
    path = pull_backbone(params.model, log=lambda msg: print(msg, file=sys.stderr))
    record = read_source(path) or {}
    print(
        f"{path}  source={record.get('source', 'local')}  sha256={backbone_hash(path)}  "
        f"({time.monotonic() - started:.1f}s)"
    )
    return 0
