"""Convolutions with standardized weights: StdConv2d (BiT) and ScaledStdConv2d (NFNets)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.fx import Proxy

from ..core import check_eps, check_positive_int
from ..core.types import DeviceLike, DTypeLike, FactoryKwargs
from ..functional.weight_standardization import weight_standardization
from ._same_padding import pad_same, padding_value
from .base import TensorOrProxy, traced_call

__all__ = ["ScaledStdConv2d", "StdConv2d"]


class _StandardizedConv(nn.Conv2d):
    """What both layers share: construction as timm's, the SAME padding, eps checked once."""

    def _init_conv(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int],
        padding: int | tuple[int, int] | str | None,
        dilation: int | tuple[int, int],
        groups: int,
        bias: bool,
        eps: float,
        factory: FactoryKwargs,
    ) -> None:
        check_positive_int(in_channels, "in_channels")
        check_positive_int(out_channels, "out_channels")
        padding, dynamic = padding_value(padding, kernel_size, stride, dilation)
        nn.Conv2d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, **factory
        )
        self.same_pad = dynamic
        self.eps = check_eps(eps)

    def standardized_weight(self) -> torch.Tensor:
        """The weight the convolution uses: standardized (and scaled) from ``self.weight``."""
        raise NotImplementedError

    def forward(self, input: TensorOrProxy) -> TensorOrProxy:
        if isinstance(input, Proxy):
            return traced_call(self, input)
        if self.same_pad:
            input = pad_same(input, self.kernel_size, self.stride, self.dilation)
        out: torch.Tensor = self._conv_forward(input, self.standardized_weight(), self.bias)  # untyped in torch
        return out

    def extra_repr(self) -> str:
        text: str = super().extra_repr() + f", eps={self.eps}"  # type: ignore[no-untyped-call]  # unannotated in torch
        return text + (", padding='same' (computed per input)" if self.same_pad else "")


class StdConv2d(_StandardizedConv):
    r"""Conv2d with Weight Standardization (Qiao et al., 2019), as in BiT (ResNetV2 + GroupNorm).

    Each output channel's filter is standardized over its fan-in before every call:

    .. math::

        \hat W_o = \frac{W_o - \mathrm{mean}(W_o)}{\sqrt{\mathrm{Var}(W_o) + \epsilon}}

    (biased variance over the C_in/groups · k_h · k_w weights of output channel o), then the
    input is convolved with Ŵ. A drop-in for timm's ``StdConv2d`` and ``StdConv2dSame``: the
    same constructor (``padding=None`` is timm's symmetric default, ``padding="same"`` its
    TensorFlow-style SAME), parameters and state-dict keys, and an instance of
    :class:`torch.nn.Conv2d`. The standardization is :func:`normlab.functional.weight_standardization`.
    For inference, :func:`normlab.surgery.fold_weight_standardization` bakes Ŵ into a plain
    ``nn.Conv2d``.

    Args:
        in_channel, out_channels, kernel_size, stride, dilation, groups, bias: as ``nn.Conv2d``
            (``bias=False`` by default, as timm's).
        padding: None (default: ``((stride − 1) + dilation·(k − 1)) // 2``), an int or pair,
            ``"same"`` or ``"valid"``.
        eps: added to the variance; timm's default 1e-6 (BiT's checkpoints use 1e-8).
        device, dtype: device and floating dtype of the parameters and buffers, as in
            torch.nn. Default None (torch's defaults).
    """

    def __init__(
        self,
        in_channel: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str | None = None,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        eps: float = 1e-6,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
    ) -> None:
        factory: FactoryKwargs = {"device": device, "dtype": dtype}
        self._init_conv(in_channel, out_channels, kernel_size, stride, padding, dilation, groups, bias, eps, factory)

    def standardized_weight(self) -> torch.Tensor:
        return weight_standardization(self.weight, self.eps)


class ScaledStdConv2d(_StandardizedConv):
    r"""Conv2d with Scaled Weight Standardization (Brock et al., 2021), as in NFNets.

    .. math::

        \hat W_o = g_o \cdot \frac{\gamma}{\sqrt{n}} \cdot
                   \frac{W_o - \mathrm{mean}(W_o)}{\sqrt{\mathrm{Var}(W_o) + \epsilon}}

    with n the fan-in, γ the activation's gain (``gamma``) and g a learned per-output-channel
    gain (parameter ``gain`` of shape (C_out, 1, 1, 1), initialized to ``gain_init``). A drop-in
    for timm's ``ScaledStdConv2d`` and ``ScaledStdConv2dSame`` (same constructor, parameters
    and state-dict keys; ``self.scale = gamma / √n`` as there).

    Args:
        in_channels, out_channels, kernel_size, stride, dilation, groups: as ``nn.Conv2d``.
        padding: None (default: ``((stride − 1) + dilation·(k − 1)) // 2``), an int or pair,
            ``"same"`` or ``"valid"``.
        bias: learn a bias. Default True, as timm's.
        gamma: γ, the gain of the activation that follows (e.g. about 1.71 for ReLU in
            NFNets). Default 1.0.
        eps: added to the variance. Default 1e-6.
        gain_init: the initial value of the learned gain g. Default 1.0.
        device, dtype: device and floating dtype of the parameters, as in torch.nn. Default
            None (torch's defaults).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str | None = None,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        gamma: float = 1.0,
        eps: float = 1e-6,
        gain_init: float = 1.0,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
    ) -> None:
        factory: FactoryKwargs = {"device": device, "dtype": dtype}
        self._init_conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, eps, factory)
        self.scale = gamma * self.weight[0].numel() ** -0.5  # γ / √fan_in, as timm's
        self.gain_init = gain_init
        self.gain = nn.Parameter(torch.empty((self.out_channels, 1, 1, 1), **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The convolution's own reset, and the gain back to ``gain_init``."""
        super().reset_parameters()
        gain = self.__dict__.get("_parameters", {}).get("gain")  # absent while nn.Conv2d is built
        if gain is not None:
            nn.init.constant_(gain, self.gain_init)

    def standardized_weight(self) -> torch.Tensor:
        return weight_standardization(self.weight, self.eps, gain=self.gain * self.scale)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.scale * math.sqrt(self.weight[0].numel()):.4g}"
