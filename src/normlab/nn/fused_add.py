"""AddLayerNorm and AddRMSNorm: residual add + norm, the pre-norm transformer step."""

from __future__ import annotations

from typing import TYPE_CHECKING, overload

import torch
from torch.fx import Proxy

from ..core import row_norm
from .base import PerSampleNorm, TensorOrProxy, traced_call
from .layernorm import LayerNorm, RMSNorm

if TYPE_CHECKING:
    _RowNorm = PerSampleNorm  # what _AddNorm is mixed into: LayerNorm or RMSNorm
else:
    _RowNorm = object

__all__ = ["AddLayerNorm", "AddRMSNorm"]


class _AddNorm(_RowNorm):
    """The forward of both: ``(norm(x + residual), x + residual)``, one call of the row family."""

    # as LayerNorm and RMSNorm hold them (RMSNorm: eps may be None, no β)
    normalized_shape: tuple[int, ...]
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float | None
    _centered = True
    _operation = "add_layer_norm"

    @overload
    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    @overload
    def forward(self, x: Proxy, residual: Proxy) -> Proxy: ...
    def forward(self, x: TensorOrProxy, residual: TensorOrProxy) -> tuple[torch.Tensor, torch.Tensor] | Proxy:
        if isinstance(x, Proxy) or isinstance(residual, Proxy):
            return traced_call(self, x, more=(residual,))
        if not self.__dict__.get("_settings_checked", False):
            self._check_settings()
        bias = self.bias if self._centered else None  # RMSNorm has no β
        shape, centered = self.normalized_shape, self._centered
        return row_norm(
            x, shape, self.weight, bias, self.eps, centered=centered, residual=residual, operation=self._operation
        )


# A LayerNorm by its parameters, state dict and isinstance, not by its call: forward takes a
# residual and returns a pair, and the attributes are typed for RMSNorm too.
class AddLayerNorm(_AddNorm, LayerNorm):  # type: ignore[misc]
    r"""``forward(x, residual) -> (layer_norm(x + residual), x + residual)`` in one pass.

    The pre-norm transformer step: the block's output ``x`` joins the residual stream, and
    the next sublayer reads the normalized stream. Same constructor, parameters and
    state-dict keys as :class:`normlab.nn.LayerNorm` (of which it is a subclass), so a
    checkpoint's norm loads into it as is; both outputs take part in autograd. See
    :func:`normlab.functional.add_layer_norm`.

    Args:
        normalized_shape: an int or a sequence of ints, the trailing dims to normalize over.
        eps: added to the variance before the square root; a finite number >= 0. Default 1e-5.
        elementwise_affine: learn γ (init 1) and β (init 0). Default True.
        bias: learn β (with ``elementwise_affine``). Default True.
        device, dtype: device and floating dtype of the parameters and buffers, as in
            torch.nn. Default None (torch's defaults).

    Shape:
        - x, residual: (\*, \*normalized_shape), the same shape.
        - Output: ``(normed, summed)``, each of that shape.
    """


class AddRMSNorm(_AddNorm, RMSNorm):  # type: ignore[misc]  # as AddLayerNorm: forward differs
    r"""``forward(x, residual) -> (rms_norm(x + residual), x + residual)`` in one pass.

    As :class:`AddLayerNorm`, for :class:`normlab.nn.RMSNorm` (same constructor, parameters
    and state-dict keys). See :func:`normlab.functional.add_rms_norm`.

    Args:
        normalized_shape: an int or a sequence of ints, the trailing dims to normalize over.
        eps: added to the mean square; None for the machine epsilon of the computation dtype.
            Default None.
        elementwise_affine: learn the gain (init 1). Default True.
        device, dtype: device and floating dtype of the parameters and buffers, as in
            torch.nn. Default None (torch's defaults).

    Shape:
        - x, residual: (\*, \*normalized_shape), the same shape.
        - Output: ``(normed, summed)``, each of that shape.
    """

    _centered = False
    _operation = "add_rms_norm"
