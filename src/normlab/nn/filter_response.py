"""Filter Response Normalization and the Thresholded Linear Unit (Singh & Krishnan, 2020)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.fx import Proxy

from ..core import check_positive_int
from ..core.checks import InputError
from ..core.types import ActLayer, DeviceLike, DTypeLike
from ..functional.filter_response import filter_response_norm, tlu
from .base import FreezableNorm, TensorOrProxy, check_channel_input, init_channel_params, traced_call

__all__ = ["TLU", "FilterResponseNorm2d", "FilterResponseNormAct2d", "FilterResponseNormTlu2d"]

_FRN_MATH = r"""
    .. math::

        \nu^2_{n,c} = \frac{1}{HW} \sum_{h,w} x_{n,c,h,w}^2, \qquad
        y = \gamma_c \, \frac{x}{\sqrt{\nu^2_{n,c} + \epsilon}} + \beta_c

    Each (sample, channel) is divided by the root mean square of its own response over
    (H, W) — no mean is subtracted and nothing depends on the batch, so training and eval
    agree and any batch size works.
"""


class _FilterResponseBase(FreezableNorm, nn.Module):
    """Parameters (γ = 1, β = 0 and, with a TLU, τ = 0), eps and the 4D input check."""

    num_features: int
    eps: float
    weight: nn.Parameter
    bias: nn.Parameter
    tau: nn.Parameter | None

    def _init_frn(self, num_features: int, eps: float, tau: bool, device: DeviceLike, dtype: DTypeLike) -> None:
        init_channel_params(self, num_features, eps, "tau", tau, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """γ = 1, β = 0, τ = 0."""
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        if self.tau is not None:
            nn.init.zeros_(self.tau)

    def _frn(self, input: torch.Tensor) -> torch.Tensor:
        check_channel_input(self, input, (4,), "(N, C, H, W)")
        return filter_response_norm(input, self.weight, self.bias, self.eps, tau=self.tau)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class FilterResponseNorm2d(_FilterResponseBase):
    __doc__ = (
        r"""Filter Response Normalization of an (N, C, H, W) input, without an activation.
"""
        + _FRN_MATH
        + r"""
    Follow it with :class:`TLU` (or use :class:`FilterResponseNormTlu2d`): FRN does not centre
    its output, and the paper pairs it with a learned threshold instead of ReLU's fixed one.
    Parameters ``weight`` (γ) and ``bias`` (β), shape (C,).

    Args:
        num_features: C.
        eps: added to ν²; timm's default 1e-5 (the paper's 1e-6).
        device, dtype: device and floating dtype of the parameters, as in torch.nn.
            Default None (torch's defaults).
    """
    )

    def __init__(
        self, num_features: int, eps: float = 1e-5, device: DeviceLike = None, dtype: DTypeLike = None
    ) -> None:
        self._init_frn(num_features, eps, False, device, dtype)

    def forward(self, input: TensorOrProxy) -> TensorOrProxy:
        if isinstance(input, Proxy):
            return traced_call(self, input)
        return self._frn(input)


class FilterResponseNormTlu2d(_FilterResponseBase):
    __doc__ = (
        r"""FRN followed by the Thresholded Linear Unit, z = max(y, τ), as one layer.
"""
        + _FRN_MATH
        + r"""
    then :math:`z = \max(y, \tau_c)` with a learned per-channel threshold τ (init 0). A drop-in
    for timm's ``FilterResponseNormTlu2d``: same constructor, parameters ``weight``, ``bias``,
    ``tau`` and state-dict keys; ``apply_act=False`` leaves out the TLU (and τ).

    Args:
        num_features: C.
        apply_act: apply the TLU. Default True.
        eps: added to ν². Default 1e-5.
        rms: timm's flag; only True (the root mean square, which timm's forward always uses).
        device, dtype: device and floating dtype of the parameters, as in torch.nn.
            Default None (torch's defaults).
    """
    )

    def __init__(
        self,
        num_features: int,
        apply_act: bool = True,
        eps: float = 1e-5,
        rms: bool = True,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
        **_: object,
    ) -> None:
        _check_rms(rms)
        self._init_frn(num_features, eps, bool(apply_act), device, dtype)
        self.apply_act = bool(apply_act)
        self.rms = True

    def forward(self, input: TensorOrProxy) -> TensorOrProxy:
        if isinstance(input, Proxy):
            return traced_call(self, input)
        return self._frn(input)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", apply_act={self.apply_act}"


class FilterResponseNormAct2d(_FilterResponseBase):
    __doc__ = (
        r"""FRN followed by an activation module ``act`` (ReLU by default), as timm's layer.
"""
        + _FRN_MATH
        + r"""
    then ``act(y)``. A drop-in for timm's ``FilterResponseNormAct2d``: same constructor,
    parameters and state-dict keys. ``act_layer`` is an ``nn.Module`` class (built without
    arguments, or with ``inplace`` when given), an instance (copied), or None; with
    ``apply_act=False`` the activation is the identity.

    Args:
        num_features: C.
        apply_act: apply the activation. Default True.
        act_layer: the activation: a module class, an instance (copied) or None. Default
            ``nn.ReLU``.
        inplace: passed to ``act_layer`` when it is a class and this is not None. Default None.
        rms: timm's flag; only True (the root mean square, which timm's forward always uses).
        eps: added to ν². Default 1e-5.
        device, dtype: device and floating dtype of the parameters, as in torch.nn.
            Default None (torch's defaults).
    """
    )

    def __init__(
        self,
        num_features: int,
        apply_act: bool = True,
        act_layer: ActLayer = nn.ReLU,
        inplace: bool | None = None,
        rms: bool = True,
        eps: float = 1e-5,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
        **_: object,
    ) -> None:
        _check_rms(rms)
        self._init_frn(num_features, eps, False, device, dtype)
        self.rms = True
        self.act = make_act(act_layer if apply_act else None, inplace)

    def forward(self, input: TensorOrProxy) -> TensorOrProxy:
        if isinstance(input, Proxy):
            return traced_call(self, input)
        out: torch.Tensor = self.act(self._frn(input))  # a Module's call is typed Any
        return out


class TLU(FreezableNorm, nn.Module):
    r"""Thresholded Linear Unit: :math:`z = \max(x, \tau_c)` with a learned per-channel τ (init 0).

    The activation FRN is paired with (Singh & Krishnan, 2020), over dim 1 of an
    (N, C, \*spatial) input. Parameter ``tau``, shape (C,).

    Args:
        num_features: C.
        device, dtype: device and floating dtype of the parameters, as in torch.nn.
            Default None (torch's defaults).
    """

    def __init__(self, num_features: int, device: DeviceLike = None, dtype: DTypeLike = None) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features")
        self.tau = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.tau)

    def forward(self, input: TensorOrProxy) -> TensorOrProxy:
        if isinstance(input, Proxy):
            return traced_call(self, input)
        return tlu(input, self.tau)

    def extra_repr(self) -> str:
        return str(self.num_features)


def _check_rms(rms: object) -> None:
    if rms is not True:
        raise InputError(
            f"rms={rms!r}: filter response normalization divides by the root mean square (rms=True); timm "
            "accepts rms=False but computes the root mean square anyway"
        )


def make_act(act_layer: ActLayer, inplace: bool | None = None) -> nn.Module:
    """An activation module from a class, an instance (copied) or None (the identity)."""
    if act_layer is None:
        return nn.Identity()
    if isinstance(act_layer, nn.Module):
        return copy.deepcopy(act_layer)
    if isinstance(act_layer, type) and issubclass(act_layer, nn.Module):
        if inplace is not None:
            try:
                return act_layer(inplace=inplace)
            except TypeError:  # an activation without the keyword (nn.GELU, nn.Sigmoid)
                pass
        return act_layer()
    raise InputError(f"act_layer must be an nn.Module class, an nn.Module or None, got {act_layer!r}")
