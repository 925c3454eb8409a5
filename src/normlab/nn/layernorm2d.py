"""LayerNorm2d: LayerNorm over the channels of each position of an (N, C, H, W) tensor."""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import Proxy

from ..core import channels_first_row_norm, check_eps, check_positive_int
from ..core.checks import InputError
from ..core.types import DeviceLike, DTypeLike
from .base import PerSampleNorm, TensorOrProxy, traced_call

__all__ = ["LayerNorm2d"]


class LayerNorm2d(PerSampleNorm, nn.LayerNorm):
    r"""Layer normalization over dim 1 of an (N, C, H, W) input, per position (ConvNeXt).

    .. math::

        y_{n,:,h,w} = \frac{x_{n,:,h,w} - \mathrm{E}_c[x_{n,c,h,w}]}
                           {\sqrt{\mathrm{Var}_c[x_{n,c,h,w}] + \epsilon}} \cdot \gamma + \beta

    The statistics of each position are over its C channels; γ and β are per channel. Like
    timm's ``LayerNorm2d`` it is a :class:`torch.nn.LayerNorm` with ``normalized_shape =
    (C,)``, with timm's constructor and state-dict keys (``weight``, ``bias`` of shape (C,)),
    so timm checkpoints load and ``isinstance(m, nn.LayerNorm)`` holds. Unlike timm's, it
    does not permute NCHW input into a copy: channels_last input is read as rows of C where
    it lies, NCHW input is normalized over dim 1 directly. Training and eval behave the same.

    Args:
        num_channels: C, the size of input dim 1.
        eps: added to the variance before the square root; a finite number >= 0. Default 1e-6
            (timm's; torch.nn.LayerNorm's is 1e-5).
        affine: learn γ (init 1) and β (init 0). Default True.
        bias: learn β (only with ``affine``). Default True.
        device, dtype: device and floating dtype of the parameters and buffers, as in
            torch.nn. Default None (torch's defaults).

    Shape:
        - Input: (N, C, H, W), contiguous or channels_last (any strides work).
        - Output: same shape; channels_last input gives channels_last output.
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-6,
        affine: bool = True,
        bias: bool = True,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
    ) -> None:
        num_channels = check_positive_int(num_channels, "num_channels")
        eps = check_eps(eps)
        nn.Module.__init__(self)
        self.normalized_shape = (num_channels,)
        self.eps = eps
        self.elementwise_affine = bool(affine)
        self._init_affine(self.normalized_shape, self.elementwise_affine, bias, device, dtype)

    @property
    def num_channels(self) -> int:
        return self.normalized_shape[0]

    def forward(self, input: TensorOrProxy) -> TensorOrProxy:
        if isinstance(input, Proxy):
            return traced_call(self, input)
        if not self.__dict__.get("_settings_checked", False):
            self._check_settings()
        weight = self.weight
        if (
            weight is not None
            and isinstance(input, torch.Tensor)
            and input.dim() == 4
            and input.shape[1] != weight.shape[0]
        ):
            raise InputError(
                f"LayerNorm2d({weight.shape[0]}) got input with {input.shape[1]} channels in dim 1 "
                f"(input shape {tuple(input.shape)}); build it with num_channels={input.shape[1]}"
            )
        return channels_first_row_norm(
            input, self.weight, self.bias, self.eps, operation="layer_norm2d", channels=self.normalized_shape[0]
        )

    def extra_repr(self) -> str:
        text = f"{self.num_channels}, eps={self.eps}, affine={self.elementwise_affine}"
        return text + (", bias=False" if self.elementwise_affine and self.bias is None else "")
