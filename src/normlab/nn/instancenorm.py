"""InstanceNorm1d/2d/3d: one (mean, variance) per (sample, channel) over the spatial dims."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.fx import Proxy

from ..core import channel_norm, instance_norm_layout
from ..core.checks import InputError, InputTypeError
from ..core.types import DeviceLike, DTypeLike
from .base import NormOptions, TensorOrProxy, _NormBase, traced_call

__all__ = ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]

_DOC = r"""Instance normalization over a {shape_words} input (Ulyanov et al., 2016).

    A drop-in for :class:`torch.nn.{name}`, and an instance of it: same constructor arguments and defaults
    (``affine=False``, ``track_running_stats=False``), same parameters, buffers and
    state-dict version.

    Each (sample, channel) plane is normalized by its own mean and biased variance
    over ({spatial}). With ``track_running_stats=True`` the layer also keeps running
    estimates — the batch average of the per-instance means and *unbiased* variances —
    and uses them in eval.

    Differences from torch.nn, both deliberate:

    * ``momentum=None`` gives the cumulative average, as for BatchNorm. torch.nn's
      InstanceNorm silently never updates its running estimates in that case.
    * ``num_batches_tracked`` counts the batches merged into the running estimates;
      torch.nn leaves it at 0 for InstanceNorm.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance before the square root; a finite number >= 0. Default 1e-5.
        momentum: weight of the new batch in the running estimates, in [0, 1], or
            ``None`` for the cumulative average. Default 0.1.
        affine: learn per-channel γ and β. Default False.
        track_running_stats: keep running estimates and use them in eval. Default False.
        bias: learn β (only with ``affine``). Default True.
        unbiased_running_var, on_nonfinite: keyword-only, as for
            :class:`normlab.nn.BatchNorm2d`.
        device, dtype: device and floating dtype of the parameters and buffers, as in
            torch.nn. Default None (torch's defaults).

    Shape:
        - Input: {input_shapes}
        - Output: same shape as the input.

    ``forward(input, mask=None)``: with a bool ``mask`` of valid positions, shaped like the
    input without its channel dim or broadcastable to it, each plane is normalized over its
    valid positions; padded outputs and input gradients are 0 (``docs/sequences.md``).

    A channel count that differs from ``num_features`` raises ``ValueError`` when the
    layer has parameters or running estimates, and warns otherwise (the count is then
    unused), as torch.nn does.
"""


class _InstanceNorm(_NormBase):
    _unbatched_rank = 0
    _shape_words = ""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
        *,
        bias: bool = True,
        unbiased_running_var: bool = True,
        on_nonfinite: str = "skip",
    ) -> None:
        options: NormOptions = {
            "bias": bias,
            "unbiased_running_var": unbiased_running_var,
            "on_nonfinite": on_nonfinite,
        }
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **options)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if not isinstance(input, torch.Tensor):
            raise InputTypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(input).__name__}")
        if input.dim() not in (self._unbatched_rank, self._unbatched_rank + 1):
            raise InputError(
                f"{type(self).__name__} expects a {self._shape_words} input, got a "
                f"{input.dim()}D tensor of shape {tuple(input.shape)}"
            )
        channel_dim = input.dim() - self._unbatched_rank
        channels = input.shape[channel_dim]
        if channels == self.num_features:
            return
        message = (
            f"{type(self).__name__}({self.num_features}) expects {self.num_features} "
            f"channels at input dim {channel_dim}, got {channels} (input shape "
            f"{tuple(input.shape)})"
        )
        if self.affine or self.track_running_stats:
            raise InputError(message)
        warnings.warn(
            message + "; num_features is unused without affine or running statistics",
            stacklevel=3,
        )

    def forward(self, input: TensorOrProxy, mask: torch.Tensor | None = None) -> TensorOrProxy:
        if isinstance(input, Proxy):
            return traced_call(self, input, mask)
        self._check_input_dim(input)
        unbatched = input.dim() == self._unbatched_rank
        x = input.unsqueeze(0) if unbatched else input
        running = self.__dict__.get("_running_stats") or self._make_running_stats()
        tracked = running.buffers["running_mean"] is not None
        # torch.nn's InstanceNorm rule, read on every call: each instance's own statistics
        # unless tracking (and not training); the estimates, where there are any, are always
        # passed — switched off after construction, it keeps updating them
        y = channel_norm(
            x,
            self.weight,
            self.bias,
            groups=x.shape[1],
            eps=self.eps,
            batch_stats=(self.training and not self.frozen) or not self.track_running_stats,
            running=running if tracked else None,
            mask=mask,
            operation="instance_norm",
            copy_weight=True,
        )
        y = instance_norm_layout(y)
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_InstanceNorm, nn.InstanceNorm1d):
    _unbatched_rank = 2
    _shape_words = "2D (C, L) or 3D (N, C, L)"
    __doc__ = _DOC.format(
        name="InstanceNorm1d", shape_words=_shape_words, spatial="L", input_shapes="(N, C, L) or (C, L)"
    )


class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):
    _unbatched_rank = 3
    _shape_words = "3D (C, H, W) or 4D (N, C, H, W)"
    __doc__ = _DOC.format(
        name="InstanceNorm2d", shape_words=_shape_words, spatial="H, W", input_shapes="(N, C, H, W) or (C, H, W)"
    )


class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):
    _unbatched_rank = 4
    _shape_words = "4D (C, D, H, W) or 5D (N, C, D, H, W)"
    __doc__ = _DOC.format(
        name="InstanceNorm3d",
        shape_words=_shape_words,
        spatial="D, H, W",
        input_shapes="(N, C, D, H, W) or (C, D, H, W)",
    )
