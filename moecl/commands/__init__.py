"""CLI command groups. Each module defines `register(subparsers)`; moecl.cli discovers them all.

Modules here import only argparse-level things at import time: heavy packages load inside the handlers,
so `moecl --help` stays fast.
"""
