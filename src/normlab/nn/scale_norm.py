"""ScaleNorm (Nguyen & Salazar, 2019): one learned scalar times x over its ℓ2 norm."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.fx import Proxy

from ..core import check_eps, normalize_shape_arg
from ..core.types import DeviceLike, DTypeLike, ShapeLike
from ..functional.scale_norm import scale_norm
from .base import FreezableNorm, TensorOrProxy, check_real, traced_call

__all__ = ["ScaleNorm"]


class ScaleNorm(FreezableNorm, nn.Module):
    r"""ScaleNorm over the trailing ``normalized_shape`` dims ("Transformers without Tears").

    .. math::

        y = g \, \frac{x}{\max(\lVert x \rVert_2, \epsilon)}

    with one learned scalar g (parameter ``scale``, a 0-dim tensor as in the authors' code,
    init √d for d normalized elements, so that y has unit root mean square at init). No mean is
    subtracted and there is no per-element affine; training and eval agree.

    Args:
        normalized_shape: int or sequence of ints, the trailing dims to normalize.
        eps: the smallest norm divided by (a clamp, not an addition). Default 1e-5.
        scale_init: keyword-only; g's initial value. Default √d.
        device, dtype: device and floating dtype of the parameters and buffers, as in
            torch.nn. Default None (torch's defaults).
    """

    def __init__(
        self,
        normalized_shape: ShapeLike,
        eps: float = 1e-5,
        *,
        scale_init: float | None = None,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
    ) -> None:
        super().__init__()
        self.normalized_shape = normalize_shape_arg(normalized_shape)
        self.eps = check_eps(eps)
        count = math.prod(self.normalized_shape)
        if scale_init is None:
            scale_init = math.sqrt(count)
        self.scale_init = check_real(scale_init, "scale_init", "a float or None")
        self.scale = nn.Parameter(torch.empty((), device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.scale, self.scale_init)

    def forward(self, input: TensorOrProxy) -> TensorOrProxy:
        if isinstance(input, Proxy):
            return traced_call(self, input)
        return scale_norm(input, self.normalized_shape, self.scale, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, scale_init={self.scale_init:.4g}"
