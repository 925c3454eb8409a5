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

import importlib.util
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    import torch

    from .entries import ChannelResult

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


def takes_channel(x: torch.Tensor, **call: Any) -> tuple[bool, str]:
    """See :func:`normlab.core.kernels.triton.entries.takes_channel`."""
    from .entries import takes_channel

    return takes_channel(x, **call)


def channel_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, **call: Any) -> ChannelResult:
    """See :func:`normlab.core.kernels.triton.entries.channel_norm`."""
    from .entries import channel_norm

    return channel_norm(x, weight, bias, **call)


def takes_row(
    x: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> tuple[bool, str]:
    """See :func:`normlab.core.kernels.triton.entries.takes_row`."""
    from .entries import takes_row

    return takes_row(x, normalized_shape, weight, residual)


def row_norm(
    x: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    **call: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """See :func:`normlab.core.kernels.triton.entries.row_norm`."""
    from .entries import row_norm

    return row_norm(x, normalized_shape, weight, bias, eps, **call)


def count_launches() -> AbstractContextManager[list[int]]:
    """``with count_launches() as n: ...``: ``n[0]`` Triton kernel launches inside the block."""
    from ._runtime import count_launches

    return count_launches()
