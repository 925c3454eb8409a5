"""SwitchableNorm2d: a learned mixture of InstanceNorm, LayerNorm and BatchNorm statistics."""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import Proxy

from ..core.types import DeviceLike, DTypeLike
from ..functional.switchable import switchable_norm
from .base import TensorOrProxy, _NormBase, check_channel_input, check_norm_args, traced_call

__all__ = ["SwitchableNorm2d"]


class SwitchableNorm2d(_NormBase, nn.modules.batchnorm._NormBase):
    r"""Switchable Normalization (Luo et al., 2019) of an (N, C, H, W) input.

    .. math::

        \mu = \sum_{k} w^\mu_k \mu_k, \quad \sigma^2 = \sum_{k} w^\sigma_k \sigma^2_k, \quad
        y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta, \qquad
        k \in \{\mathrm{IN}, \mathrm{LN}, \mathrm{BN}\}

    with :math:`w^\mu = \mathrm{softmax}(\lambda^\mu)`, :math:`w^\sigma = \mathrm{softmax}(\lambda^\sigma)`
    learned (parameters ``mean_weight``, ``var_weight``, init 1 — equal shares). IN's moments are
    per (sample, channel) over (H, W), LN's per sample over (C, H, W) and BN's per channel over
    (N, H, W), all one computation merged along different axes; all variances biased.

    The BN statistics follow normlab's BatchNorm conventions: the batch's in training, the
    running estimates in eval (and when frozen); ``running_var`` stores the unbiased variance;
    ``momentum`` is torch.nn's (``None``: cumulative average); a batch whose statistics are not
    finite never reaches the estimates. Parameters and buffers are a BatchNorm's (``weight``,
    ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``) plus the two mixture
    logits. The authors' code differs in conventions (momentum 0.997 as a decay, the unbiased
    instance variance, E[x²] − E[x]² for LN/BN, and γ/β of shape (1, C, 1, 1)); this layer keeps
    normlab's.

    Args:
        num_features: C.
        eps, momentum, affine, track_running_stats: as :class:`torch.nn.BatchNorm2d`.
        using_bn: keyword-only; False mixes IN and LN only (2 logits each, no running
            statistics): nothing then depends on the batch. Default True.
        bias, unbiased_running_var, on_nonfinite: keyword-only, as normlab's BatchNorm2d.
        device, dtype: device and floating dtype of the parameters and buffers, as in
            torch.nn. Default None (torch's defaults).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
        *,
        using_bn: bool = True,
        bias: bool = True,
        unbiased_running_var: bool = True,
        on_nonfinite: str = "skip",
    ) -> None:
        num_features, eps, momentum = check_norm_args(num_features, eps, momentum)
        self.using_bn = bool(using_bn)
        nn.modules.batchnorm._NormBase.__init__(
            self, num_features, eps, momentum, affine, bool(track_running_stats) and self.using_bn, device, dtype
        )
        self._init_normlab(bias=bias, unbiased_running_var=unbiased_running_var, on_nonfinite=on_nonfinite)
        kinds = 3 if self.using_bn else 2
        self.mean_weight = nn.Parameter(torch.ones(kinds, device=device, dtype=dtype))
        self.var_weight = nn.Parameter(torch.ones(kinds, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        """Running statistics, γ = 1, β = 0, and equal mixture logits."""
        super().reset_parameters()
        for name in ("mean_weight", "var_weight"):
            param = self.__dict__.get("_parameters", {}).get(name)  # absent while torch's base is built
            if param is not None:
                nn.init.ones_(param)

    def _check_input_dim(self, input: object) -> None:
        check_channel_input(self, input, (4,), "(N, C, H, W)")

    def forward(self, input: TensorOrProxy) -> TensorOrProxy:
        if isinstance(input, Proxy):
            return traced_call(self, input)
        self._check_input_dim(input)
        if "_running_stats" not in self.__dict__:
            self._make_running_stats()  # its settings, checked after an assignment
        batch_stats = (self.training and not self.frozen) or self.running_mean is None
        return switchable_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.mean_weight,
            self.var_weight,
            batch_stats,
            self.momentum,
            self.eps,
            num_batches_tracked=self.num_batches_tracked if batch_stats and self.running_mean is not None else None,
            unbiased_running_var=self.unbiased_running_var,
            on_nonfinite=self.on_nonfinite,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.using_bn else ", using_bn=False")
