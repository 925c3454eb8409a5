"""Helpers shared by the subcommands: errors users can act on, atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = ["CommandError", "atomic_write_bytes", "atomic_write_json", "parse_shape"]


class CommandError(Exception):
    """A user error: printed as one line, exit status 2, nothing written."""


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise CommandError(f"--input-shape must be comma-separated ints like 1,3,32,32, got {text!r}")
    if not shape or any(d <= 0 for d in shape):
        raise CommandError(f"--input-shape must be positive ints like 1,3,32,32, got {text!r}")
    return shape


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, write) -> None:
    """Write through ``write(file)`` to a temporary file, then rename: all or nothing."""
    _atomic(path, write)


def atomic_write_json(path: Path, payload: dict) -> None:
    _atomic(path, lambda handle: handle.write(json.dumps(payload, indent=2, default=str).encode()))
