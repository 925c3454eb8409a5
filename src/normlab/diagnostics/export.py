"""Writing a Probe's records: strict JSON, spreadsheet-safe CSV, and which process writes
under torch.distributed."""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["csv_text", "json_safe", "output_path", "rank_and_world"]

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value):
    """A text cell a spreadsheet would run as a formula (a layer named ``=cmd|...``) is
    prefixed with ``'`` so it is shown as text (OWASP's advice on CSV injection); numbers
    are written as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def json_safe(value):
    """NaN and ±inf have no JSON spelling: they become null (each record's
    ``*nonfinite`` fields say which quantity was not finite)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def output_path(path: str | Path, rank_files: bool) -> Path | None:
    """Where this process writes ``path``: itself; under torch.distributed (world size >
    1), on rank 0 only (None elsewhere) or, with ``rank_files``, ``name.rank<r>.ext`` on
    each rank."""
    path = Path(path)
    rank, world = rank_and_world()
    if world == 1:
        return path
    if rank_files:
        return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
    return path if rank == 0 else None
