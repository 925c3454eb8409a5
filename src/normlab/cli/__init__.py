"""The ``normlab`` command line: thin wrappers over the library's layers."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import bench, demo, experiments, surgery, sync_demo
from .common import CommandError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normlab",
        description="Normalization layers, model surgery and the experiments that explain them.",
    )
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    experiments.add_parsers(sub)
    demo.add_parser(sub)
    surgery.add_parser(sub)
    bench.add_parser(sub)
    sync_demo.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except CommandError as err:
        print(f"normlab {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
