"""LayerNorm and RMSNorm: statistics over the trailing ``normalized_shape`` of each sample."""

from __future__ import annotations

from torch import nn
from torch.fx import Proxy

from ..core import check_eps, normalize_shape_arg, row_norm
from ..core.types import DeviceLike, DTypeLike, ShapeLike
from .base import PerSampleNorm, TensorOrProxy, traced_call

__all__ = ["LayerNorm", "RMSNorm"]


class LayerNorm(PerSampleNorm, nn.LayerNorm):
    r"""Layer normalization (Ba et al., 2016) over the trailing ``normalized_shape`` dims.

    A drop-in for :class:`torch.nn.LayerNorm`, and an instance of it: same constructor arguments, defaults,
    parameters and state-dict keys.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    Mean and biased variance are taken over the last ``len(normalized_shape)`` dims of
    each sample; γ and β are elementwise, of shape ``normalized_shape``. Training and
    eval behave the same.

    Args:
        normalized_shape: int or sequence of ints, the trailing dims to normalize.
        eps: added to the variance before the square root; a finite number >= 0. Default 1e-5.
        elementwise_affine: learn γ (init 1) and β (init 0). Default True.
        bias: learn β (only with ``elementwise_affine``). Default True.
        device, dtype: device and floating dtype of the parameters and buffers, as in
            torch.nn. Default None (torch's defaults).

    Shape:
        - Input: (\*, \*normalized_shape).
        - Output: same shape as the input.
    """

    def __init__(
        self,
        normalized_shape: ShapeLike,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
    ) -> None:
        shape = normalize_shape_arg(normalized_shape)
        eps = check_eps(eps)
        nn.Module.__init__(self)
        self.normalized_shape = shape
        self.eps = eps
        self.elementwise_affine = bool(elementwise_affine)
        self._init_affine(shape, self.elementwise_affine, bias, device, dtype)

    def forward(self, input: TensorOrProxy) -> TensorOrProxy:
        if isinstance(input, Proxy):
            return traced_call(self, input)
        if not self.__dict__.get("_settings_checked", False):
            self._check_settings()
        return row_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, operation="layer_norm")

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}"
        )


class RMSNorm(PerSampleNorm, nn.RMSNorm):
    r"""Root-mean-square normalization (Zhang & Sennrich, 2019) over ``normalized_shape``.

    A drop-in for :class:`torch.nn.RMSNorm`, and an instance of it: same constructor arguments, defaults,
    parameters and state-dict keys.

    .. math::

        y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \cdot \gamma

    No mean is subtracted and there is no β.

    Args:
        normalized_shape: int or sequence of ints, the trailing dims to normalize.
        eps: added to the mean square; ``None`` (default) uses the machine epsilon of
            the computation dtype (float32's for float16/bfloat16/float32 input,
            float64's for float64), as torch.nn does.
        elementwise_affine: learn γ (init 1). Default True.
        device, dtype: device and floating dtype of the parameters and buffers, as in
            torch.nn. Default None (torch's defaults).

    Shape:
        - Input: (\*, \*normalized_shape).
        - Output: same shape as the input.
    """

    _eps_may_be_none = True  # None: the machine epsilon of the computation dtype

    def __init__(
        self,
        normalized_shape: ShapeLike,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
    ) -> None:
        shape = normalize_shape_arg(normalized_shape)
        eps = None if eps is None else check_eps(eps)
        nn.Module.__init__(self)
        self.normalized_shape = shape
        self.eps = eps
        self.elementwise_affine = bool(elementwise_affine)
        self._init_affine(shape, self.elementwise_affine, None, device, dtype)  # no β

    def forward(self, input: TensorOrProxy) -> TensorOrProxy:
        if isinstance(input, Proxy):
            return traced_call(self, input)
        if not self.__dict__.get("_settings_checked", False):
            self._check_settings()
        return row_norm(input, self.normalized_shape, self.weight, None, self.eps, centered=False, operation="rms_norm")

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
