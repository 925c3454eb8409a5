"""QKNorm: normalize the queries and keys of attention per head before their dot product."""

from __future__ import annotations

from typing import overload

import torch
from torch import nn
from torch.fx import Proxy

from ..core import check_eps, check_floating_input, check_positive_int, compute_dtype, mean_square
from ..core.checks import InputError
from ..core.types import DeviceLike, DTypeLike, FactoryKwargs
from .base import TensorOrProxy, check_real, traced_call
from .layernorm import LayerNorm, RMSNorm

__all__ = ["QKNorm"]

KINDS = ("rms", "layer", "l2")


class QKNorm(nn.Module):
    r"""Query-key normalization over the head dimension, for q and k of (\*, head_dim).

    Large attention logits make softmax saturate and training diverge at high learning rates,
    in small models already (Wortsman et al., 2023; Dehghani et al., 2023 for ViT-22B).
    Normalizing q and k per head bounds them. Three kinds:

    - ``"rms"``: RMSNorm of q and of k (``q_norm``, ``k_norm``: :class:`normlab.nn.RMSNorm`);
    - ``"layer"``: LayerNorm of each (:class:`normlab.nn.LayerNorm`) — timm's
      ``Attention(qk_norm=True)``, whose ``q_norm``/``k_norm`` state-dict entries load here;
    - ``"l2"``: q and k divided by their ℓ2 norms, q then multiplied by a learned scalar g
      (parameter ``scale``) — Henry et al. (2020), whose logits are g·cos(q, k). Use it with
      ``F.scaled_dot_product_attention(q, k, v, scale=qk_norm.softmax_scale)``: the softmax scale
      is then 1, as g replaces 1/√d. Henry et al. initialize g to log2(L² − L) for sequences of
      length L (``scale_init``, default 10, about L = 32).

    ``forward(q, k)`` returns ``(q', k')``; the two get their own γ (and β). Heads share them.

    Args:
        head_dim: the size of the last dim of q and k.
        kind: "rms" (default), "layer" or "l2".
        eps: added to the mean square or variance (rms, layer: ``None`` is the layer's default),
            or the smallest norm divided by (l2: default 1e-6).
        elementwise_affine: learn γ (and β for "layer"). Default True.
        scale_init: keyword-only, "l2" only: g's initial value.
        device, dtype: device and floating dtype of the parameters and buffers, as in
            torch.nn. Default None (torch's defaults).
    """

    q_norm: RMSNorm | LayerNorm  # "rms" and "layer" only
    k_norm: RMSNorm | LayerNorm

    def __init__(
        self,
        head_dim: int,
        kind: str = "rms",
        eps: float | None = None,
        elementwise_affine: bool = True,
        *,
        scale_init: float = 10.0,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
    ) -> None:
        super().__init__()
        self.head_dim = check_positive_int(head_dim, "head_dim")
        if kind not in KINDS:
            raise InputError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        factory: FactoryKwargs = {"device": device, "dtype": dtype}
        if kind == "rms":
            self.q_norm = RMSNorm(head_dim, eps, elementwise_affine, **factory)
            self.k_norm = RMSNorm(head_dim, eps, elementwise_affine, **factory)
        elif kind == "layer":
            eps = 1e-5 if eps is None else eps
            self.q_norm = LayerNorm(head_dim, eps, elementwise_affine, **factory)
            self.k_norm = LayerNorm(head_dim, eps, elementwise_affine, **factory)
        else:
            self.eps = check_eps(1e-6 if eps is None else eps)
            self.scale_init = check_real(scale_init, "scale_init")
            self.scale = nn.Parameter(torch.full((), self.scale_init, **factory))

    @property
    def softmax_scale(self) -> float | None:
        """The ``scale`` to pass to ``scaled_dot_product_attention``: None (its default 1/√d) for
        "rms" and "layer", 1.0 for "l2", whose learned g replaces it."""
        return 1.0 if self.kind == "l2" else None

    @overload
    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    @overload
    def forward(self, q: Proxy, k: Proxy) -> Proxy: ...
    def forward(self, q: TensorOrProxy, k: TensorOrProxy) -> tuple[torch.Tensor, torch.Tensor] | Proxy:
        if isinstance(q, Proxy):  # one call_module node under torch.fx, as normlab's other layers
            return traced_call(self, q, more=(k,))
        for name, t in (("q", q), ("k", k)):
            if isinstance(t, torch.Tensor) and (t.dim() == 0 or t.shape[-1] != self.head_dim):
                raise InputError(
                    f"QKNorm({self.head_dim}) expects {name} of shape (*, {self.head_dim}), got {tuple(t.shape)}"
                )
        if self.kind != "l2":
            return self.q_norm(q), self.k_norm(k)
        return _unit(q, self.eps) * self.scale.to(q.dtype), _unit(k, self.eps)

    def extra_repr(self) -> str:
        text = f"{self.head_dim}, kind={self.kind!r}"
        return text + (f", eps={self.eps}, scale_init={self.scale_init}" if self.kind == "l2" else "")


def _unit(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / max(‖x‖₂, eps) over the last dim, the norm from normlab's mean square."""
    check_floating_input(x)
    cdtype = compute_dtype(x.dtype)
    norm = (mean_square(x, (-1,)) * x.shape[-1]).clamp(min=eps * eps).sqrt()  # finite gradient at 0
    return (x.to(cdtype) / norm).to(x.dtype)
