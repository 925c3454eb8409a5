"""FrozenBatchNorm1d/2d/3d: BatchNorm reduced to the fixed affine map it computes in eval."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.fx import Proxy

from ..core import RunningStats, channel_norm, check_eps, check_positive_int
from ..core.types import DeviceLike, DTypeLike, FactoryKwargs
from .base import ChannelInput, TensorOrProxy, traced_call

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]


# a module constant, not the base class's docstring: ``python -OO`` strips docstrings, and the
# three classes below append their input shapes to it
_DOC = r"""BatchNorm with fixed statistics and fixed affine parameters (detectron2/torchvision).

    .. math:: y = \frac{x - \text{running\_mean}}{\sqrt{\text{running\_var} + \epsilon}}
              \cdot \text{weight} + \text{bias}

    ``weight``, ``bias``, ``running_mean`` and ``running_var`` are *buffers*: nothing here
    is trained and nothing changes in ``train()`` mode; the input still receives
    gradients. Defaults make the layer an exact identity (``running_var = 1 − eps``, so
    ``running_var + eps = 1``), and a checkpoint that holds only ``weight`` and
    ``bias`` (backbones converted from Caffe2) loads with identity statistics, so the
    layer computes ``weight·x + bias``. A BatchNorm checkpoint loads directly; its
    ``num_batches_tracked`` is dropped.

    Args:
        num_features: C, the number of channels.
        eps: added to ``running_var`` before the square root; a finite number >= 0.
            Default 1e-5.
        device, dtype: device and floating dtype of the buffers, as in torch.nn. Default
            None (torch's defaults).
    """


class _FrozenBatchNorm(ChannelInput, nn.Module):
    __doc__ = _DOC

    eps: float
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(
        self, num_features: int, eps: float = 1e-5, device: DeviceLike = None, dtype: DTypeLike = None
    ) -> None:
        super().__init__()
        factory: FactoryKwargs = {"device": device, "dtype": dtype}
        self.num_features = check_positive_int(num_features, "num_features")
        self.eps = check_eps(eps)
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory) - eps)
        # the statistics it normalizes with, read from its buffers at every call; never updated
        self._statistics = RunningStats(self._buffers, None, True, "skip")

    def forward(self, input: TensorOrProxy) -> TensorOrProxy:
        if isinstance(input, Proxy):
            return traced_call(self, input)
        self._check_input_dim(input)
        return channel_norm(
            input,
            self.weight,
            self.bias,
            eps=self.eps,
            batch_stats=False,
            running=self._statistics,
            operation="frozen_batch_norm",
        )

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: object) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        for name in ("running_mean", "running_var"):
            # Missing statistics (Caffe2-converted backbones): keep the identity ones.
            state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class FrozenBatchNorm1d(_FrozenBatchNorm):
    __doc__ = _DOC + "\n    Shape:\n        - Input: (N, C) or (N, C, L).\n        - Output: same shape.\n"
    _ranks = (2, 3)
    _shape_words = "2D (N, C) or 3D (N, C, L)"


class FrozenBatchNorm2d(_FrozenBatchNorm):
    __doc__ = _DOC + "\n    Shape:\n        - Input: (N, C, H, W).\n        - Output: same shape.\n"
    _ranks = (4,)
    _shape_words = "4D (N, C, H, W)"


class FrozenBatchNorm3d(_FrozenBatchNorm):
    __doc__ = _DOC + "\n    Shape:\n        - Input: (N, C, D, H, W).\n        - Output: same shape.\n"
    _ranks = (5,)
    _shape_words = "5D (N, C, D, H, W)"
