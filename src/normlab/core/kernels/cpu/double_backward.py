"""Second derivatives through the kernels: differentiate the composed reference.

The kernels' backward returns plain gradients, with no graph to differentiate again. Under
``create_graph=True`` both autograd bindings of a kernel — the C++ nodes of eager calls
(autograd.cpp, which call these functions) and the registered operators' formulas
(operators.py) — hand the saved operands here instead, and the gradient is that of normlab's
composed reference (:func:`normlab.core.reference.reference_normalize`), which carries a graph:
second derivatives are exact, as torch.nn's are.

Each function takes the saved operands and ``needs`` (which inputs want a gradient) and
returns the gradients with a graph, None where not wanted.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

import torch

from ... import composed
from ...activation import activation_for_code, apply_activation
from ...calls import ChannelCall
from ...reference import graph_grads, reference_normalize

if TYPE_CHECKING:
    from ...running import RunningStats

__all__ = ["add_row", "channel", "masked_channel", "row"]


def channel(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    prelu: torch.Tensor | None,
    shift: torch.Tensor,
    rstd: torch.Tensor,
    groups: int,
    given: bool,
    eps: float,
    act: int,
    param: float,
    needs: Sequence[bool],
) -> tuple[torch.Tensor | None, ...]:
    """(dx, dγ, dβ, dPReLU) of a channel norm; ``needs`` for (x, γ, β, _, _, PReLU) as the
    operator's inputs are ordered."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    with torch.enable_grad():
        if groups < 0 or given:
            target, dims = x, (0,) + tuple(range(2, x.dim()))
            w = None if weight is None else weight.view(view)
            b = None if bias is None else bias.view(view)
        else:
            cg = x.shape[1] // groups
            target = x.unflatten(1, (groups, cg))  # type: ignore[no-untyped-call]  # (N, G, C//G, *spatial); unannotated in torch
            dims = tuple(range(2, target.dim()))
            shape = (1, groups, cg) + (1,) * (target.dim() - 3)
            w = None if weight is None else weight.view(shape)
            b = None if bias is None else bias.view(shape)
        if given:
            # detached: the statistics are outputs of the forward itself, constants here
            mean, scale = shift.detach().view(view).to(x.dtype), rstd.detach().view(view).to(x.dtype)
            z = reference_normalize(target, w, b, dims, 0.0, mean=mean, rstd=scale)
        else:
            z = reference_normalize(target, w, b, dims, eps)
        z = z.reshape(x.shape) if z.shape != x.shape else z
        name = activation_for_code(act).name
        y = apply_activation(z, name, param, prelu if name == "prelu" else None)
        needs = tuple(needs) + (False,) * 10  # shorter when nested in create_graph
        return tuple(graph_grads(y, (x, weight, bias, prelu), [needs[i] for i in (0, 1, 2, 5)], dy))


def masked_channel(
    dy: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    prelu: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    groups: int,
    given: bool,
    eps: float,
    act: int,
    param: float,
    needs: Sequence[bool],
) -> tuple[torch.Tensor | None, ...]:
    """(dx, dγ, dβ, dPReLU) of a masked channel norm (``mask`` (N, *spatial); ``running_mean``
    and ``running_var`` the given statistics, or None), differentiating the composed ops'
    masked reference; ``needs`` for (x, γ, β, PReLU)."""
    # given statistics: the reference reads only the estimates, which a namespace carries
    running = (
        cast("RunningStats", SimpleNamespace(running_mean=running_mean, running_var=running_var)) if given else None
    )
    activation = (activation_for_code(act).name, param, prelu)
    call = ChannelCall(x, weight, bias, groups, eps, not given, running, activation, False, mask)
    with torch.enable_grad():
        y = composed.masked_channel_norm(call, reference=True)
        return tuple(graph_grads(y, (x, weight, bias, prelu), needs[:4], dy))


def _trailing_dims(x: torch.Tensor, k: int) -> tuple[int, ...]:
    """The trailing dims of ``x`` that make up its k normalized elements."""
    size = 1
    dims: list[int] = []
    for d in range(x.dim() - 1, -1, -1):
        if size == k and dims:  # k = 1 still takes the last dim
            break
        dims.insert(0, d)
        size *= x.shape[d]
    return tuple(dims)


def _reference(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, k: int, eps: float, centered: bool
) -> torch.Tensor:
    """The composed LayerNorm/RMSNorm of ``x`` over its trailing k elements, with a graph."""
    dims = _trailing_dims(x, k)
    affine_shape = x.shape[dims[0] :]
    w = None if weight is None else weight.view(affine_shape)
    b = None if bias is None else bias.view(affine_shape)
    return reference_normalize(x, w, b, dims, eps, centered=centered)


def row(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    k: int,
    eps: float,
    centered: bool,
    needs: Sequence[bool],
) -> tuple[torch.Tensor | None, ...]:
    """(dx, dγ, dβ) of a LayerNorm (``centered``) or RMSNorm over the trailing k elements."""
    with torch.enable_grad():
        y = _reference(x, weight, bias, k, eps, centered)
        return tuple(graph_grads(y, (x, weight, bias), needs[:3], dy))


def add_row(
    dy: torch.Tensor,
    ds: torch.Tensor | None,
    s: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    k: int,
    eps: float,
    centered: bool,
    needs: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d_sum, dγ, dβ) of s = x + residual, y = norm(s): the norm's part differentiated on the
    saved sum, plus ``ds``. ``s`` is the forward's own output, so its graph leads back to x and
    the residual: higher derivatives flow through the first-order formula. ``needs`` for (γ, β)."""
    with torch.enable_grad():
        y = _reference(s, weight, bias, k, eps, centered)
        d_s, dw, db = graph_grads(y, (s, weight, bias), (True, *needs[:2]), dy)
    return (d_s if ds is None else cast(torch.Tensor, d_s) + ds), dw, db  # y depends on s: d_s is there
