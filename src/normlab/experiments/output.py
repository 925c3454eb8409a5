"""What runs write: all-or-nothing files, strict JSON, figures, and the machine they ran on."""

from __future__ import annotations

import json
import math
import os
import platform
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

__all__ = [
    "WriteFailed",
    "atomic_write_files",
    "atomic_write_text",
    "finite_or_none",
    "heatmap",
    "machine_info",
    "pyplot",
    "save_figure",
    "write_json",
]


class WriteFailed(OSError):
    """A file of an all-or-nothing write could not be written; none of them were."""


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.{kind}")


def _missing_folders(folder: Path) -> list[Path]:
    """The folders ``mkdir(parents=True)`` would create for ``folder``, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def atomic_write_files(files: Mapping[Path, Callable[[BinaryIO], None]]) -> None:
    """Write each ``path`` through ``write(file)``: every file or none of them.

    Each is written to a temporary file beside it, then all are renamed into place; if a
    write or a rename fails, the files already renamed are put back as they were (a file
    that existed is restored, a new one removed), folders created for them are removed,
    and the error is raised as one :class:`WriteFailed` naming the file. Files are created
    with mode 0666 less the umask, as ``open()`` creates them.
    """
    temps: dict[Path, Path] = {}
    created: list[Path] = []
    committed: list[tuple[Path, Path | None]] = []  # (target, backup of the file it replaced)
    current = next(iter(files), None)
    try:
        for current, write in files.items():
            missing = _missing_folders(current.parent)
            current.parent.mkdir(parents=True, exist_ok=True)
            created.extend(missing)
            tmp = temps[current] = _sibling(current, "tmp")
            # O_EXCL: never follow a link planted at the temporary name; 0o666: the umask decides.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as handle:
                write(handle)
        for current, tmp in temps.items():
            backup = None
            if current.exists():
                backup = _sibling(current, "bak")
                try:
                    os.link(current, backup)  # the old file stays in place until the rename
                except OSError:  # a file system without hard links
                    shutil.copy2(current, backup)
            committed.append((current, backup))
            os.replace(tmp, current)
    except BaseException as err:
        for target, backup in reversed(committed):
            if backup is not None:
                os.replace(backup, target)
            elif target.exists():
                target.unlink()
        committed.clear()
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                pass
        if isinstance(err, OSError):
            raise WriteFailed(f"cannot write {str(current)!r}: {err.strerror or err}") from err
        raise
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        for _, backup in committed:
            if backup is not None:
                backup.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` all or nothing: a reader never sees half a file."""
    atomic_write_files({path: lambda handle: handle.write(text.encode("utf-8"))})
    return path


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: a diverged number is written as null."""
    return float(value) if value is not None and math.isfinite(value) else None


def _clean(value):
    """NaN and ±inf (a diverged run, an empty mean) become null: JSON has neither."""
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _default(value):
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_json(path: Path, payload: dict) -> Path:
    """Write ``payload`` as strict JSON (non-finite numbers as null), atomically."""
    return atomic_write_text(path, json.dumps(_clean(payload), indent=2, allow_nan=False, default=_default))


def machine_info() -> dict:
    """What a measurement ran on, for the files that report it."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
    }


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_dir: str | Path, name: str, *, dpi: int = 110) -> str:
    """Save a matplotlib figure as ``out_dir/name.png`` and close it; returns the file name."""
    file = f"{name}.png"
    fig.savefig(Path(out_dir) / file, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return file


def heatmap(
    ax, grid: list[list[float]], *, cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None
):
    """``grid`` (rows of numbers) as coloured cells with each value written in, one decimal;
    the colour scale spans ``vmin``–``vmax`` (default: the grid's own range)."""
    flat = [v for row in grid for v in row]
    vmin = min(flat) if vmin is None else vmin
    vmax = max(flat) if vmax is None else vmax
    ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=max(vmax, vmin + 1e-6), aspect="auto")
    for a, row in enumerate(grid):
        for b, v in enumerate(row):
            color = "white" if v < (vmin + vmax) / 2 else "black"  # readable on dark and light cells
            ax.text(b, a, f"{v:.1f}", ha="center", va="center", fontsize=8, color=color)
