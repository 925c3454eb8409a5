"""normlab's Triton kernels: what torch.nn has no GPU kernel for.

* the channel family — BatchNorm, InstanceNorm, GroupNorm — with a fused activation (every
  activation of ``normlab.core.activation.ACTIVATIONS`` that has a kernel code), NCHW or
  channels_last (any strides whose spatial dims collapse), masked statistics, the in-place
  (output-only) mode, and BatchNorm's running estimates updated inside the launch with
  normlab's conventions;
* the row family — LayerNorm, RMSNorm — with the residual add fused in.

Each forward and each backward is one kernel launch, float32 accumulation for float16 and
bfloat16, and the mean carried as an exact shift plus a small offset (float32 results within
about 1e-7 of float64 on 1e4 ± 0.01 data). On a GPU they run compiled; with
``TRITON_INTERPRET=1`` set before this package is imported, the same kernels run on CPU
tensors through Triton's interpreter (correct, not fast) — how they are tested without a GPU.

The path rule (:func:`normlab.core.paths.choose_path`) reaches them through
:mod:`.backend`, which it loads the first time it is asked about a CUDA tensor or the backend
is forced to "triton": ``auto`` sends the CUDA calls they take here, ``set_backend("triton")``
every call they take on any device they run on. Called directly::

    from normlab.core.kernels import triton as triton_kernels
    if triton_kernels.available():
        ok, why = triton_kernels.takes_channel(x, activation=..., running_mean=..., groups=...)
        if ok:
            out = triton_kernels.channel_norm(x, weight, bias, groups=..., eps=..., mask=..., ...)
    # and takes_row / row_norm for LayerNorm, RMSNorm and the add

:func:`available` never imports ``triton``; the entries import it on first use.
docs/performance.md ("Triton kernels") has the traffic model: bytes and launches per call.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._runtime import count_launches
    from .entries import channel_norm, row_norm, takes_channel, takes_row

__all__ = [
    "available",
    "channel_norm",
    "count_launches",
    "interpreted",
    "row_norm",
    "status",
    "takes_channel",
    "takes_row",
]


def interpreted() -> bool:
    """Whether the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """Whether the kernels can run here: ``triton`` is installed, and either a CUDA device is
    present or the interpreter is on. Imports nothing heavy."""
    if importlib.util.find_spec("triton") is None:
        return False
    if interpreted():
        return True
    import torch

    return torch.cuda.is_available()


def status() -> str:
    """One line: where the kernels run, or why they cannot."""
    if importlib.util.find_spec("triton") is None:
        return "Triton kernels unavailable: the triton package is not installed"
    if interpreted():
        return "Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1): CPU tensors, for testing"
    if available():
        return "Triton kernels run compiled on CUDA"
    return "Triton kernels unavailable: no CUDA device (TRITON_INTERPRET=1 runs them on CPU tensors)"


#: what the package offers from its modules that import ``triton``: loaded on first use
_ON_FIRST_USE = {
    "channel_norm": "entries",
    "count_launches": "_runtime",
    "row_norm": "entries",
    "takes_channel": "entries",
    "takes_row": "entries",
}


def __getattr__(name: str) -> object:
    where = _ON_FIRST_USE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{where}", __name__), name)
