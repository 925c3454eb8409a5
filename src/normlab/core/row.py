"""The row family's one entry: LayerNorm and RMSNorm over the trailing dims, after an optional
residual add (the pre-norm transformer step), and LayerNorm2d over dim 1.

Modules and functionals call :func:`row_norm` (and :func:`channels_first_row_norm`) the same
way; it asks the path rule (:func:`normlab.core.paths.choose_path`) once and runs what it
answers — the kernels' eager C++ entry, the registered operators, torch's ops
(:mod:`normlab.core.native`) or normlab's (:mod:`normlab.core.composed`). A module's call
arrives unchecked (its constructor checked the shape, eps, γ and β); the checks run here off
the direct path and where the kernels refused. A functional checks first (``checked=True``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast, overload

import torch

from . import composed, decomposed, native
from .call_checks import check_row_args
from .calls import RowCall
from .checks import InputError, InputTypeError, check_floating_input
from .kernels.cpu import build as _cpu
from .moments import reduced_count
from .paths import CHANNELS_FIRST, KERNELS, KERNELS_DIRECT, NATIVE, ROW, TRITON, Decision, _gpu_kernels, choose_path

if TYPE_CHECKING:
    from .kernels import KernelBackend

__all__ = ["add_row_norm", "channel_layer_norm", "channels_first_row_norm", "row_norm"]

_F32_EPS = torch.finfo(torch.float32).eps  # eps=None on the kernels' path: float32's machine epsilon


@overload
def row_norm(
    x: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float | None,
    *,
    centered: bool = ...,
    residual: None = ...,
    operation: str = ...,
    checked: bool = ...,
) -> torch.Tensor: ...


@overload
def row_norm(
    x: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float | None,
    *,
    centered: bool = ...,
    residual: torch.Tensor,
    operation: str = ...,
    checked: bool = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


def row_norm(
    x: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float | None,
    *,
    centered: bool = True,
    residual: torch.Tensor | None = None,
    operation: str = "layer_norm",
    checked: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""LayerNorm (``centered``) or RMSNorm of ``x`` over its trailing ``normalized_shape``
    dims; with a ``residual``, ``(norm(x + residual), x + residual)``.

    ``eps=None`` (RMSNorm) is the machine epsilon of the computation dtype, as torch.nn's. A
    residual that broadcasts to x or has another dtype is added by torch first, and the sum
    normalized; one of x's shape and dtype is added inside the norm's pass where the kernels
    run (x and the residual read once, the sum and the output written once).

    Args:
        x: the input, (..., \*normalized_shape).
        normalized_shape: the trailing dims normalized over.
        weight: γ, of ``normalized_shape``, or None.
        bias: β, of ``normalized_shape``, or None.
        eps: added to the variance, or None (RMSNorm: the machine epsilon).
        centered: keyword-only; LayerNorm (False: RMSNorm). Default True.
        residual: keyword-only; added to ``x`` first, or None. Default None.
        operation: keyword-only; the name recorded. Default "layer_norm".
        checked: keyword-only; the caller checked the arguments. Default False.

    Returns:
        The output, or ``(output, x + residual)`` with a residual.
    """
    if residual is not None and not (
        type(residual) is type(x) and residual.dtype == x.dtype and residual.shape == x.shape
    ):
        if not checked:
            check_row_args(operation, x, normalized_shape, weight, bias, eps, centered=centered, residual=residual)
        summed = x + residual
        if summed.dtype != x.dtype:
            # One rule for LayerNorm and RMSNorm: the sum (torch's type promotion) is the input
            # the norm checks — its parameters must take the sum's dtype
            try:
                check_row_args(operation, summed, normalized_shape, weight, bias, eps, centered=centered)
            except InputTypeError as error:
                raise InputTypeError(
                    f"{operation}: x ({x.dtype}) + residual ({residual.dtype}) is {summed.dtype}, the "
                    f"input normalized: {error}. Cast the residual to x's dtype, or the parameters"
                ) from None
        y = row_norm(
            summed, normalized_shape, weight, bias, eps, centered=centered, operation=operation, checked=checked
        )
        return y, summed
    decision = choose_path(x, ROW, operation, centered=centered, call=(normalized_shape, weight, residual))
    if decision is KERNELS_DIRECT:
        if not centered and x.is_inference() and torch.is_grad_enabled():
            # torch.nn's RMSNorm (composed ops) keeps no inference tensor for backward, so it
            # takes one made under inference_mode; a normal copy lets the kernels' node keep it
            # (asked on the eager path only: a compiler cannot trace the question)
            x = x.clone()
        if TYPE_CHECKING:  # said without a call on the direct path: KERNELS_DIRECT is answered only
            assert _cpu.module is not None  # once the kernels are loaded
        out = _cpu.module.row_norm(
            x, normalized_shape, weight, bias, _F32_EPS if eps is None else eps, centered, residual
        )
        if out is not None:
            return out
        # refused: report what does not fit, with the message every path gives; what the checks
        # accept is a parameter the kernels do not read (a tensor subclass such as a wrapper
        # parameter, a lazily negated view), which torch's ops take, as torch.nn's layers do
        check_row_args(operation, x, normalized_shape, weight, bias, eps, centered=centered, residual=residual)
        decision = Decision(NATIVE, "eager", "a parameter the kernels do not read: torch's ops")
    if not checked or eps is None:
        eps = check_row_args(operation, x, normalized_shape, weight, bias, eps, centered=centered, residual=residual)
    normalized_shape = tuple(normalized_shape)
    path = decision.path
    if path == KERNELS:
        k = reduced_count(normalized_shape, range(len(normalized_shape)))
        if residual is not None:
            y, s, _, _, _ = torch.ops.normlab.add_row_norm(
                x.contiguous(), residual.contiguous(), weight, bias, k, eps, centered
            )
            return y, s
        out = torch.ops.normlab.row_norm(x.contiguous(), weight, bias, k, eps, centered)
        return cast(torch.Tensor, out[0])  # torch.ops' operators are untyped
    if path == TRITON:  # the residual added inside the kernels' pass
        gpu = cast("KernelBackend", _gpu_kernels[0])  # the rule answers "triton" only with them loaded
        return gpu.row_norm(RowCall(x, normalized_shape, weight, bias, eps, centered, residual))
    summed = x if residual is None else x + residual
    if path == NATIVE:
        y = native.row_norm(RowCall(summed, normalized_shape, weight, bias, eps, centered))
    else:
        if TYPE_CHECKING:  # eps stays None only for a complex input, which the rule sends to native
            assert eps is not None
        if decision.how == "decomposed":
            y = decomposed.row_norm(summed, normalized_shape, weight, bias, eps, centered)
        else:
            if not torch.compiler.is_compiling() and summed.is_inference() and torch.is_grad_enabled():
                summed = summed.clone()  # the composed ops keep their input for backward (as above)
            y = composed.row_norm(RowCall(summed, normalized_shape, weight, bias, eps, centered))
    return y if residual is None else (y, summed)


def channels_first_row_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    operation: str = "layer_norm2d",
    checked: bool = False,
    channels: int | None = None,
) -> torch.Tensor:
    """LayerNorm over dim 1 of an (N, C, H, W) tensor — each position normalized over its
    channels (ConvNeXt's LayerNorm2d) — without a permuting copy.

    channels_last: the (N, H, W, C) view is contiguous rows of C, which :func:`row_norm`
    normalizes (its own path, kernels included); the result viewed back is channels_last.
    Other layouts: the path rule's answer for rows over dim 1 — normlab's composed ops, or
    torch's ``layer_norm`` on the permuted view (export, torch.func, other dtypes and
    devices), the graph exporters know for this layer.

    Args:
        x: the (N, C, H, W) input.
        weight: γ, shape (C,), or None.
        bias: β, shape (C,), or None.
        eps: added to the variance.
        operation: keyword-only; the name recorded. Default "layer_norm2d".
        checked: keyword-only; the caller checked the arguments. Default False.
        channels: keyword-only; C, where the caller knows it. Default None.

    Returns:
        The output, (N, C, H, W).
    """
    if not checked:
        check_floating_input(x)
        if x.dim() != 4:
            raise InputError(f"{operation} expects input of shape (N, C, H, W), got shape {tuple(x.shape)}")
    if channels is None:  # a layer passes its width: a Python int even where x's sizes are traced
        channels = int(x.shape[1]) if weight is None else int(weight.shape[0])
    rows = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view
    if rows.is_contiguous():
        return row_norm(rows, (channels,), weight, bias, eps, operation=operation, checked=checked).permute(0, 3, 1, 2)
    if not checked:
        eps = check_row_args(operation, rows, (channels,), weight, bias, eps)
    decision = choose_path(x, CHANNELS_FIRST, operation)
    if decision.path == NATIVE:
        return native.channels_first_row_norm(x, weight, bias, eps, channels)
    return composed.channels_first_row_norm(x, weight, bias, eps)


def add_row_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float | None,
    *,
    centered: bool,
    operation: str = "add_layer_norm",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual), x + residual)``: :func:`row_norm` with a ``residual``.

    Args:
        x, residual, normalized_shape, weight, bias, eps: as for :func:`row_norm`.
        centered: keyword-only; LayerNorm (False: RMSNorm).
        operation: keyword-only; the name recorded. Default "add_layer_norm".
    """
    return row_norm(x, normalized_shape, weight, bias, eps, centered=centered, residual=residual, operation=operation)


def channel_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    operation: str = "layer_norm2d",
) -> torch.Tensor:
    """The former name of :func:`channels_first_row_norm`.

    Args:
        x, weight, bias, eps: as for :func:`channels_first_row_norm`.
        operation: keyword-only; the name recorded. Default "layer_norm2d".
    """
    return channels_first_row_norm(x, weight, bias, eps, operation=operation)
