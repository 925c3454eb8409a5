"""AddLayerNorm and AddRMSNorm: residual add + norm, the pre-norm transformer step."""

from __future__ import annotations

import torch
from torch.fx import Proxy

from ..functional.fused_add import _add_norm
from .layernorm import LayerNorm, RMSNorm

__all__ = ["AddLayerNorm", "AddRMSNorm"]


def _traced_pair(module, x: Proxy, residual) -> Proxy:
    """``module(x, residual)`` as one ``call_module`` node under ``torch.fx.symbolic_trace``."""
    tracer = x.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (x, residual), {})


def _fits(module, x: torch.Tensor, residual: torch.Tensor) -> bool:
    """The per-call checks the constructor cannot make: shapes, dtypes and devices."""
    w = module.weight
    k = len(module.normalized_shape)
    return (
        isinstance(x, torch.Tensor)
        and isinstance(residual, torch.Tensor)
        and x.is_floating_point()
        and residual.is_floating_point()
        and residual.shape == x.shape
        and residual.device == x.device
        and x.shape[x.dim() - k :] == module.normalized_shape
        and (w is None or (w.dtype == x.dtype and w.device == x.device))
    )


class AddLayerNorm(LayerNorm):
    r"""``forward(x, residual) -> (layer_norm(x + residual), x + residual)`` in one pass.

    The pre-norm transformer step: the block's output ``x`` joins the residual stream, and
    the next sublayer reads the normalized stream. Same constructor, parameters and
    state-dict keys as :class:`normlab.nn.LayerNorm` (of which it is a subclass), so a
    checkpoint's norm loads into it as is; both outputs take part in autograd. See
    :func:`normlab.functional.add_layer_norm`.

    Shape:
        - x, residual: (\*, \*normalized_shape), the same shape.
        - Output: ``(normed, summed)``, each of that shape.
    """

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(x, Proxy) or isinstance(residual, Proxy):
            return _traced_pair(self, x, residual)
        self._check_eps()
        return _add_norm(
            "add_layer_norm",
            x,
            residual,
            self.normalized_shape,
            self.weight,
            self.bias,
            self.eps,
            centered=True,
            validated=_fits(self, x, residual),
        )


class AddRMSNorm(RMSNorm):
    r"""``forward(x, residual) -> (rms_norm(x + residual), x + residual)`` in one pass.

    As :class:`AddLayerNorm`, for :class:`normlab.nn.RMSNorm` (same constructor, parameters
    and state-dict keys). See :func:`normlab.functional.add_rms_norm`.
    """

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(x, Proxy) or isinstance(residual, Proxy):
            return _traced_pair(self, x, residual)
        self._check_eps()
        return _add_norm(
            "add_rms_norm",
            x,
            residual,
            self.normalized_shape,
            self.weight,
            None,
            self.eps,
            centered=False,
            validated=_fits(self, x, residual),
        )
