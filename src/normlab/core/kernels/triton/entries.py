"""The two family entries of the Triton kernels and the questions the path rule asks first.

    takes_channel(x, ...) / channel_norm(x, ...)   BatchNorm, InstanceNorm, GroupNorm: masked
                                                   or not, fused activation, in place, running
                                                   estimates updated in the same launch
    takes_row(x, ...) / row_norm(x, ...)           LayerNorm, RMSNorm, with the residual add

The ``takes_*`` functions answer ``(True, "")`` or ``(False, why)`` from the call's metadata
alone (never a host read). The entries assume a yes and that the arguments were checked the
way normlab's functionals check them; each forward is one kernel launch (plus, in the
in-place mode with γ, the host read of γ that finds the channels too small to invert).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, NamedTuple, cast

import torch

from ...activation import ACTIVATIONS
from ...running import NonFiniteStatisticsError
from . import ops
from ._runtime import INTERPRETED
from .channel import collapsible
from .row import MAX_ROW

__all__ = ["ChannelResult", "channel_norm", "row_norm", "takes_channel", "takes_row"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _input_ok(x: torch.Tensor) -> tuple[bool, str]:
    """The input's device and dtype, which every kernel needs."""
    kind = x.device.type  # meta too: shapes only, the fake kernels answer
    if INTERPRETED and kind not in ("cpu", "meta"):
        return False, f"the Triton interpreter runs on CPU tensors, not {kind}"
    if not INTERPRETED and kind not in ("cuda", "meta"):
        return False, f"compiled Triton kernels need CUDA tensors, not {kind}"
    if x.dtype not in DTYPES:
        return False, f"dtype {x.dtype} (the kernels take float32, float16, bfloat16)"
    return True, ""


def takes_channel(
    x: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    activation: str = "identity",
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    batch_stats: bool = True,
    groups: int = -1,
) -> tuple[bool, str]:
    """Whether :func:`channel_norm` takes this call, and if not, why."""
    ok, why = _input_ok(x)
    if not ok:
        return False, why
    if x.dim() < 2 or x.numel() == 0:
        return False, "empty input or no channel dim"
    entry = ACTIVATIONS.get(activation)
    if entry is None or not entry.fused:
        return False, f"activation {activation!r} has no kernel code"
    if running_mean is not None and groups > 0:
        return False, "running estimates per (sample, group) are merged by the caller"
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and (t.dim() != 1 or t.stride(0) != 1 or t.device != x.device):
            # the kernels read (and write) them as plain (C,) arrays on the input's device
            return False, f"{name} is not a contiguous 1-D tensor on the input's device"
    if not batch_stats and groups > 0:
        return False, "given statistics are per channel (BatchNorm)"
    if groups > 0 and x.shape[0] > 65535:
        return False, f"{x.shape[0]} samples: GroupNorm's programs span samples on a grid axis of at most 65535"
    return True, ""


class ChannelResult(NamedTuple):
    """What :func:`channel_norm` returns: the output and the batch statistics as the kernel
    left them, (5, K) float32 — read through the properties, which index lazily."""

    y: torch.Tensor
    stats: torch.Tensor
    status: torch.Tensor
    groups: int

    def _shaped(self, row: int) -> torch.Tensor | None:
        if self.stats.shape[1] == 0:
            return None
        values = self.stats[row]
        return values if self.groups < 0 else values.view(-1, self.groups)

    @property
    def mean(self) -> torch.Tensor | None:
        """(C,) for BatchNorm, (N, G) otherwise; None with given statistics."""
        if self.stats.shape[1] == 0:
            return None
        return cast(torch.Tensor, self._shaped(0)) + cast(torch.Tensor, self._shaped(1))  # stats are there

    @property
    def var(self) -> torch.Tensor | None:
        """The biased batch variance, shaped as :attr:`mean`."""
        return self._shaped(3)

    @property
    def count(self) -> torch.Tensor | None:  # type: ignore[override]  # a public property that shadows tuple.count()
        """Valid values behind each statistic (all of them without a mask)."""
        return self._shaped(4)


def channel_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    groups: int = -1,
    eps: float,
    mask: torch.Tensor | None = None,
    batch_stats: bool = True,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    num_batches_tracked: torch.Tensor | None = None,
    momentum: float | None = 0.1,
    unbiased: bool = True,
    on_nonfinite: str = "skip",
    activation: str = "identity",
    param: float = 0.0,
    prelu_weight: torch.Tensor | None = None,
    inplace: bool = False,
) -> ChannelResult:
    """act(norm(x)) for the channel family in one launch — the arguments of normlab's
    channel entry.

    ``groups=-1``: BatchNorm, statistics per channel; ``groups=G``: GroupNorm (G = C is
    InstanceNorm), per (sample, group). ``mask`` (bool, (N, *spatial), checked and expanded):
    statistics over the valid positions, output 0 elsewhere. ``batch_stats=False``: normalize
    with ``running_mean``/``running_var`` (eval BatchNorm); otherwise with the batch's
    statistics, merging them into ``running_mean``/``running_var`` when given (BatchNorm;
    momentum None is the cumulative average over ``num_batches_tracked``; the running
    variance unbiased unless ``unbiased=False``; a batch that is not finite, or that has fewer
    than 2 valid values, leaves them and the counter untouched — decided in the kernel, with no
    host read, except that on a CPU tensor a skipped batch warns, and ``on_nonfinite="raise"``
    reads the kernel's verdict and raises). ``inplace``: write the output over ``x`` and keep
    only it for backward (an invertible activation; batch statistics and no mask, else the
    call runs out of place, as on every other path)."""
    act = ACTIVATIONS[activation].code
    if TYPE_CHECKING:  # takes_channel refused the activations without a kernel code
        assert act is not None
    if not collapsible(x):
        x = x.contiguous()
    given = not batch_stats
    update = running_mean is not None and not given
    call = ops.OperatorArgs(
        mask,
        running_mean if (update or given) else None,
        running_var if (update or given) else None,
        num_batches_tracked if update else None,
        groups,
        eps,
        act,
        param,
        -1.0 if momentum is None else float(momentum),
        unbiased,
    )
    if inplace and not given and mask is None:
        found: list[torch.Tensor] = []
        recorded = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
        y = ops.ChannelNormInPlace.apply(x, weight, bias, call, found)  # type: ignore[no-untyped-call, unused-ignore]  # untyped in torch 2.13
        if not recorded:
            # the kernel wrote through a pointer; without a graph mark_dirty did nothing
            torch.autograd.graph.increment_version(x)
        stats, status = found
    else:
        y, stats, status = ops.ChannelNorm.apply(x, weight, bias, prelu_weight, call, given)  # type: ignore[no-untyped-call, unused-ignore]  # untyped in torch 2.13
    if update:
        _report(status, x, on_nonfinite)
    return ChannelResult(y, stats, status, groups)


def _report(status: torch.Tensor, x: torch.Tensor, on_nonfinite: str) -> None:
    """Say what the kernel decided about a non-finite batch where that costs nothing (a CPU
    tensor) or was asked for (``"raise"``, a host read)."""
    if torch.compiler.is_compiling() or type(status) is not torch.Tensor or status.device.type == "meta":
        return
    if on_nonfinite != "raise" and status.device.type != "cpu":
        return
    if int(status) != 0:
        return
    if on_nonfinite == "raise":
        raise NonFiniteStatisticsError(
            "batch statistics are not finite (NaN or inf in the input or its variance, or a running "
            "estimate that would overflow); the running estimates are unchanged. Pass "
            "on_nonfinite='skip' to skip such batches instead"
        )
    warnings.warn(
        "batch statistics are not finite (NaN or inf in the input or its variance, or a running "
        "estimate that would overflow); skipped this batch, the running estimates are unchanged",
        RuntimeWarning,
        stacklevel=4,
    )


def takes_row(
    x: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> tuple[bool, str]:
    """Whether :func:`row_norm` takes this call, and if not, why."""
    ok, why = _input_ok(x)
    if not ok:
        return False, why
    k = 1
    for d in normalized_shape:
        k *= d
    if x.numel() == 0 or k == 0:
        return False, "empty input"
    if k > MAX_ROW:
        return False, f"rows of {k} elements (a program holds at most {MAX_ROW})"
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device):
        return False, "a residual of another shape, dtype or device (torch adds it, broadcasting)"
    if weight is not None and weight.device != x.device:
        return False, "parameters on another device"
    return True, ""


def row_norm(
    x: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    centered: bool,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm (``centered``) or RMSNorm over the trailing ``normalized_shape`` dims in one
    launch; with ``residual``, ``(norm(x + residual), x + residual)``."""
    k = 1
    for d in normalized_shape:
        k *= d
    x = x.contiguous()
    if residual is not None:
        residual = residual.contiguous()
    y, s, _ = ops.RowNorm.apply(x, residual, weight, bias, k, eps, centered)  # type: ignore[no-untyped-call, unused-ignore]  # untyped in torch 2.13
    return y if residual is None else (y, s)
