"""DyT and Derf: the elementwise layers that replace LayerNorm in normalization-free transformers."""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import Proxy

from ..core import normalize_shape_arg
from ..core.checks import InputError, InputTypeError
from ..core.types import DeviceLike, DTypeLike, FactoryKwargs, ShapeLike
from ..functional.squash import derf, dyt
from .base import FreezableNorm, TensorOrProxy, check_real, traced_call

__all__ = ["Derf", "DyT"]


class _Squash(FreezableNorm, nn.Module):
    """α (and Derf's shift) of shape (1,), γ = 1 and β = 0 of ``normalized_shape``."""

    def _init_squash(
        self,
        normalized_shape: ShapeLike,
        channels_last: bool,
        alpha_init_value: float,
        elementwise_affine: bool,
        bias: bool,
        factory: FactoryKwargs,
    ) -> None:
        nn.Module.__init__(self)
        if not isinstance(channels_last, bool):
            raise InputTypeError(f"channels_last must be a bool, got {type(channels_last).__name__} {channels_last!r}")
        shape = normalize_shape_arg(normalized_shape)
        if not channels_last and len(shape) != 1:
            raise InputError(
                f"with channels_last=False normalized_shape is the channel count C of dim 1, got {normalized_shape!r}"
            )
        alpha = check_real(alpha_init_value, "alpha_init_value")
        self.normalized_shape = shape
        self.channels_last = channels_last
        self.alpha_init_value = alpha
        self.elementwise_affine = bool(elementwise_affine)
        self.alpha = nn.Parameter(torch.empty(1, **factory))
        affine = self.elementwise_affine
        self.weight = nn.Parameter(torch.empty(shape, **factory)) if affine else None
        self.bias = nn.Parameter(torch.empty(shape, **factory)) if affine and bias else None

    def reset_parameters(self) -> None:
        """α = alpha_init_value, γ = 1, β = 0 (Derf: shift = shift_init_value)."""
        nn.init.constant_(self.alpha, self.alpha_init_value)
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _trailing_shape(self, input: object) -> None:
        if isinstance(input, torch.Tensor):
            shape = self.normalized_shape
            got = tuple(input.shape[1:2]) if not self.channels_last else tuple(input.shape[input.dim() - len(shape) :])
            if got != shape:
                where = "dim 1" if not self.channels_last else "the trailing dims"
                raise InputError(
                    f"{type(self).__name__}({', '.join(map(str, shape))}) expects {shape} at {where} of the input, "
                    f"got input shape {tuple(input.shape)}"
                )

    def extra_repr(self) -> str:
        text = f"{self.normalized_shape}, channels_last={self.channels_last}, alpha_init_value={self.alpha_init_value}"
        if not self.elementwise_affine:
            text += ", elementwise_affine=False"
        elif self.bias is None:
            text += ", bias=False"
        return text


class DyT(_Squash):
    r"""Dynamic Tanh (Zhu, Chen, He, LeCun & Liu, CVPR 2025): a drop-in for LayerNorm without statistics.

    .. math::

        y = \gamma \tanh(\alpha x) + \beta

    with a learned scalar α (init ``alpha_init_value``: 0.5 in the paper's ViTs; its LLaMA
    models use 0.8 before attention and 0.2 before the MLP, the paper's sensitivity study) and
    per-channel γ, β. Each element is squashed on its own: no reduction, training and eval
    agree. Parameters ``alpha`` (shape (1,)), ``weight``, ``bias`` — the authors' names and
    shapes, so their checkpoints load. Plain torch ops, differentiated by autograd
    (:mod:`normlab.functional.squash` says why no closed form).

    Args:
        normalized_shape: the trailing dims γ and β cover (an int C for (*, C) tokens), or, with
            ``channels_last=False``, the channel count C of dim 1 of an (N, C, \*spatial) input.
        channels_last: where the channels are (the authors' argument). Default True.
        alpha_init_value: α's initial value. Default 0.5.
        elementwise_affine, bias: keyword-only; learn γ (and β). Default True.
        device, dtype: keyword-only; device and floating dtype of the parameters, as in
            torch.nn. Default None (torch's defaults).
    """

    def __init__(
        self,
        normalized_shape: ShapeLike,
        channels_last: bool = True,
        alpha_init_value: float = 0.5,
        *,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
    ) -> None:
        factory: FactoryKwargs = {"device": device, "dtype": dtype}
        self._init_squash(normalized_shape, channels_last, alpha_init_value, elementwise_affine, bias, factory)
        self.reset_parameters()

    def forward(self, input: TensorOrProxy) -> TensorOrProxy:
        if isinstance(input, Proxy):
            return traced_call(self, input)
        self._trailing_shape(input)
        return dyt(input, self.alpha, self.weight, self.bias, channels_last=self.channels_last)


class Derf(_Squash):
    r"""Dynamic erf (Chen, Lu, Zhu, Sun & Liu, 2025, arXiv 2512.10938).

    .. math::

        y = \gamma \,\mathrm{erf}(\alpha x + s) + \beta

    with learned scalars α (init ``alpha_init_value``, 0.5) and s (``shift``, init
    ``shift_init_value``, 0) and per-channel γ, β. Parameters ``alpha``, ``shift`` (shape (1,)),
    ``weight``, ``bias``, as the authors'.

    Args:
        normalized_shape: the trailing dims γ and β cover (an int C for (*, C) tokens), or, with
            ``channels_last=False``, the channel count C of dim 1 of an (N, C, \*spatial) input.
        channels_last: where the channels are. Default True.
        alpha_init_value: α's initial value. Default 0.5.
        shift_init_value: s's initial value; a real number. Default 0.0.
        elementwise_affine, bias: keyword-only; learn γ (and β). Default True.
        device, dtype: keyword-only; device and floating dtype of the parameters, as in
            torch.nn. Default None (torch's defaults).
    """

    def __init__(
        self,
        normalized_shape: ShapeLike,
        channels_last: bool = True,
        alpha_init_value: float = 0.5,
        shift_init_value: float = 0.0,
        *,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
    ) -> None:
        factory: FactoryKwargs = {"device": device, "dtype": dtype}
        self._init_squash(normalized_shape, channels_last, alpha_init_value, elementwise_affine, bias, factory)
        self.shift_init_value = check_real(shift_init_value, "shift_init_value")
        self.shift = nn.Parameter(torch.empty(1, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        shift = self.__dict__.get("_parameters", {}).get("shift")
        if shift is not None:
            nn.init.constant_(shift, self.shift_init_value)

    def forward(self, input: TensorOrProxy) -> TensorOrProxy:
        if isinstance(input, Proxy):
            return traced_call(self, input)
        self._trailing_shape(input)
        return derf(input, self.alpha, self.shift, self.weight, self.bias, channels_last=self.channels_last)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", shift_init_value={self.shift_init_value}"
