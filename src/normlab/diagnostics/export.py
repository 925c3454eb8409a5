"""Writing a Probe's records: strict JSON, spreadsheet-safe CSV, TensorBoard, and which
process writes under torch.distributed."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from .probe import Probe

__all__ = [
    "TensorBoardWriter",
    "csv_text",
    "json_safe",
    "output_path",
    "rank_and_world",
    "tensorboard_writer",
    "write_csv",
    "write_tensorboard",
]

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class TensorBoardWriter(Protocol):
    """What :meth:`Probe.to_tensorboard <normlab.diagnostics.Probe.to_tensorboard>` calls on
    its writer: ``torch.utils.tensorboard.SummaryWriter``'s ``add_scalar`` and
    ``add_histogram_raw`` (``flush`` too, where the writer has one)."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int, /) -> object: ...

    def add_histogram_raw(
        self,
        tag: str,
        /,
        *,
        min: float,
        max: float,
        num: float,
        sum: float,
        sum_squares: float,
        bucket_limits: list[float],
        bucket_counts: list[float],
        global_step: int,
    ) -> object: ...


def csv_text(value: object) -> object:
    """A text cell a spreadsheet would run as a formula (a layer named ``=cmd|...``) is
    prefixed with ``'`` so it is shown as text (OWASP's advice on CSV injection); numbers
    are written as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def json_safe(value: object) -> object:
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


def write_csv(probe: Probe, path: Path) -> Path:
    """``probe``'s records as one CSV row per (layer, recorded step), scalars only."""
    rows = [
        {
            "layer": name,
            "type": type(probe.layers[name]).__name__,
            **{k: v for k, v in r.items() if not isinstance(v, list)},
        }
        for name in probe.order
        for r in probe.records(name)
    ]
    columns = ["layer", "type"] + sorted({k for row in rows for k in row} - {"layer", "type"})
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: csv_text(v) for k, v in row.items()} for row in rows)
    return path


def tensorboard_writer(log_dir: str | Path | None, rank_files: bool) -> TensorBoardWriter | None:
    """A SummaryWriter for this process: on rank 0 only (None elsewhere) or, with
    ``rank_files``, per rank in ``log_dir/rank<r>``."""
    rank, world = rank_and_world()
    if world > 1:
        if not rank_files and rank != 0:
            return None
        if rank_files:
            log_dir = Path(log_dir or "runs") / f"rank{rank}"
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError("to_tensorboard needs the tensorboard package: pip install tensorboard") from err
    return SummaryWriter(log_dir=None if log_dir is None else str(log_dir))


def write_tensorboard(probe: Probe, writer: TensorBoardWriter) -> None:
    """``probe``'s scalars and histograms to ``writer`` (``add_scalar``/``add_histogram_raw``)."""
    for name in probe.order:
        lo, hi = probe._range(name)
        edges = torch.linspace(lo, hi, probe.bins + 1)
        for r in probe.records(name):
            for key, value in r.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    writer.add_scalar(f"{name}/{key}", value, r["step"])
            if "hist" in r:
                counts = torch.tensor(r["hist"]) * r.get("numel", 1)
                writer.add_histogram_raw(
                    f"{name}/activation",
                    min=lo,
                    max=hi,
                    num=float(counts.sum()),
                    sum=0.0,
                    sum_squares=0.0,
                    bucket_limits=edges[1:].tolist(),
                    bucket_counts=counts.tolist(),
                    global_step=r["step"],
                )
    if hasattr(writer, "flush"):
        writer.flush()
