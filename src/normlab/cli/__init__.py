"""The ``normlab`` command line: thin wrappers over the library's layers."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

from .. import __version__
from . import bench, demo, experiments, surgery, sync_demo
from .common import CommandError, SubcommandParser

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normlab",
        description="Normalization layers, model surgery and the experiments that explain them.",
    )
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=SubcommandParser)
    experiments.add_parsers(sub)
    demo.add_parser(sub)
    surgery.add_parser(sub)
    bench.add_parser(sub)
    sync_demo.add_parser(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that clean-up runs (workers stopped, partial
    output marked) before the command exits with status 143."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated("SIGTERM")


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the innermost subcommand given, with its usage
        getattr(args, "usage_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        with _sigterm_as_exception():
            code: int = args.func(args)
            return code
    except CommandError as err:
        print(f"normlab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"normlab {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 128 + signal.SIGINT
    except Terminated:
        print(f"normlab {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
