"""GroupNorm: one (mean, variance) per (sample, group of channels)."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.fx import Proxy

from ..core import channel_norm, check_eps, check_positive_int
from ..core.checks import InputError
from ..core.types import DeviceLike, DTypeLike
from .base import PerSampleNorm, TensorOrProxy, traced_call

__all__ = ["GroupNorm"]


class GroupNorm(PerSampleNorm, nn.GroupNorm):
    r"""Group normalization (Wu & He, 2018) over an (N, C, \*spatial) input.

    A drop-in for :class:`torch.nn.GroupNorm`, and an instance of it: same constructor arguments, defaults,
    parameters and state-dict keys.

    The C channels are split into ``num_groups`` contiguous groups; each (sample, group)
    is normalized by its own mean and biased variance over (C // G, \*spatial), then
    scaled and shifted per channel. Nothing depends on the batch, so training and eval
    give the same result and any batch size (including 1) works. GroupNorm(1, C) is
    LayerNorm over (C, \*spatial) with per-channel affine; GroupNorm(C, C) is
    InstanceNorm with affine.

    Args:
        num_groups: G; must divide ``num_channels``.
        num_channels: C.
        eps: added to the variance before the square root; a finite number >= 0. Default 1e-5.
        affine: learn per-channel γ (init 1) and β (init 0). Default True.
        bias: keyword-only; learn β (only with ``affine``). Default True.
        device, dtype: device and floating dtype of the parameters and buffers, as in
            torch.nn. Default None (torch's defaults).

    Shape:
        - Input: (N, C, \*), any memory format; channels_last stays channels_last.
        - Output: same shape as the input.

    ``forward(input, mask=None)``: with a bool ``mask`` of valid positions, shaped like the
    input without its channel dim ((N, L) for (N, C, L)) or broadcastable to it, each
    (sample, group) is normalized over its valid positions; padded outputs and input
    gradients are 0 (``docs/sequences.md``).

    Example::

        >>> gn = normlab.nn.GroupNorm(8, 64)
        >>> y = gn(torch.randn(2, 64, 7, 7))
    """

    _operation = "group_norm"  # its name in normlab.core.record_dispatch

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
        *,
        bias: bool = True,
    ) -> None:
        check_positive_int(num_groups, "num_groups")
        check_positive_int(num_channels, "num_channels")
        if num_channels % num_groups != 0:
            raise InputError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        eps = check_eps(eps)
        nn.Module.__init__(self)  # torch's __init__ would make β whatever `bias` says
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = bool(affine)
        self._init_affine(num_channels, self.affine, bias, device, dtype)

    def forward(self, input: TensorOrProxy, mask: torch.Tensor | None = None) -> TensorOrProxy:
        if isinstance(input, Proxy):
            return traced_call(self, input, mask)
        if isinstance(input, torch.Tensor) and input.dim() >= 2 and input.shape[1] != self.num_channels:
            raise InputError(
                f"{type(self).__name__}({self.num_groups}, {self.num_channels}) expects "
                f"{self.num_channels} channels at input dim 1, got {input.shape[1]} "
                f"(input shape {tuple(input.shape)})"
            )
        d = self.__dict__
        if not d.get("_settings_checked", False):
            self._check_settings()
        activation = d.get("activation", "identity")  # GroupNormAct's (the plain norm has none)
        return channel_norm(
            input,
            self.weight,
            self.bias,
            groups=self.num_groups,
            eps=self.eps,
            activation=activation,
            param=d.get("activation_param", 0.0),
            prelu_weight=cast(nn.PReLU, self.act).weight if activation == "prelu" else None,  # GroupNormAct's
            inplace=d.get("inplace", False),
            mask=mask,
            operation=self._operation,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, "
            f"affine={self.affine}, bias={self.bias is not None}"
        )
