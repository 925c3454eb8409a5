"""Helpers shared by the subcommands: errors users can act on, argument types, output
paths checked before any work is done, and all-or-nothing writes."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from ..experiments import output

__all__ = [
    "CommandError",
    "DistinctSeeds",
    "SubcommandParser",
    "atomic_write_bytes",
    "atomic_write_files",
    "atomic_write_json",
    "check_output_dir",
    "check_output_file",
    "json_writer",
    "make_output_dir",
    "out_checked",
    "parse_shape",
    "positive_int",
    "seed",
    "write_out",
]

# The largest seed every generator a study may use accepts (NumPy's legacy seeding stops
# at 2**32 - 1; torch.manual_seed accepts more, but a seed beyond it would not reproduce
# under NumPy).
MAX_SEED = 2**32 - 1


class CommandError(Exception):
    """A user error: printed as one line, exit status 2, nothing written."""


class SubcommandParser(argparse.ArgumentParser):
    """The parser of a subcommand (and of its own subcommands): it names itself in the parsed
    arguments, so that an argument nobody knows is reported with the usage of the subcommand
    it was given to, not the top-level one (see ``normlab.cli.main``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_defaults(usage_parser=self)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise CommandError(f"--input-shape must be comma-separated ints like 1,3,32,32, got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise CommandError(f"--input-shape must be positive ints like 1,3,32,32, got {text!r}")
    return shape


# argparse types: a bad value is reported by argparse itself, as one usage line and exit 2.


def _int_from(text: str, low: int, high: float, not_int: str, out_of_range: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{not_int}, got {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{out_of_range}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _int_from(text, 1, math.inf, "must be a positive integer", "must be a positive integer (1 or more)")


def seed(text: str) -> int:
    words = f"seeds are integers from 0 to {MAX_SEED}"
    return _int_from(text, 0, MAX_SEED, words, words)


class DistinctSeeds(argparse.Action):
    """``--seeds A B ...``: each seed once. A repeated seed would run the same training
    twice and report its spread as 0 over "2 seeds"."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise argparse.ArgumentError(
                self,
                f"seed {', '.join(map(str, repeated))} given more than once; each seed is one independent run, "
                f"give distinct seeds",
            )
        setattr(namespace, self.dest, values)


# Output paths are checked before the work starts, so a typo costs seconds, not a run.


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_folder_for(path: Path, what: str) -> None:
    """``path`` (a file or folder to create) can be made inside its nearest existing ancestor."""
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise CommandError(f"{what} {str(path)!r}: {str(ancestor)!r} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CommandError(f"{what} {str(path)!r}: no permission to write in {str(ancestor)!r}")


def check_output_file(path: Path, what: str = "--out") -> None:
    """Fail early, in one line, if ``path`` cannot be written as a file."""
    if path.is_dir():
        raise CommandError(f"{what} {str(path)!r} is a folder; give a file name inside it")
    _check_folder_for(path, what)


def check_output_dir(path: Path, what: str = "--out") -> None:
    """Fail early, in one line, if ``path`` cannot be used as an output folder."""
    if path.exists():
        if not path.is_dir():
            raise CommandError(f"{what} {str(path)!r} is a file; give a folder for the results")
        if not os.access(path, os.W_OK | os.X_OK):
            raise CommandError(f"{what} {str(path)!r}: no permission to write in this folder")
        return
    _check_folder_for(path, what)


def make_output_dir(path: Path, what: str = "--out") -> Path:
    """Check, then create, an output folder; any failure is one line."""
    check_output_dir(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CommandError(f"{what} {str(path)!r}: cannot create the folder ({err.strerror or err})") from err
    return path


# All-or-nothing writes.


def atomic_write_files(files: Mapping[Path, Callable[[BinaryIO], None]]) -> None:
    """Write each ``path`` through ``write(file)``: every file or none of them (see
    :func:`normlab.experiments.output.atomic_write_files`); a failure is one
    :class:`CommandError`."""
    try:
        output.atomic_write_files(files)
    except output.WriteFailed as err:
        raise CommandError(str(err)) from err.__cause__


def atomic_write_bytes(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write(file)`` to a temporary file, then rename: all or nothing."""
    atomic_write_files({path: write})


def json_writer(payload: Mapping[str, Any]) -> Callable[[BinaryIO], None]:
    def write(handle: BinaryIO) -> None:
        handle.write(json.dumps(payload, indent=2, default=str).encode())

    return write


def atomic_write_json(path: Path, payload: Mapping[str, Any]) -> None:
    atomic_write_files({path: json_writer(payload)})


# --out: a file checked before the work, written after it.


def out_checked(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``run`` with its --out checked first: before a run that takes minutes, not after."""

    def checked(args: argparse.Namespace) -> int:
        if args.out:
            check_output_file(Path(args.out))
        return run(args)

    return checked


def write_out(args: argparse.Namespace, payload: Mapping[str, Any]) -> None:
    """--out, where given: ``payload`` as JSON, all or nothing, and a line that says so."""
    if args.out:
        atomic_write_json(Path(args.out), payload)
        print(f"wrote {args.out}")
