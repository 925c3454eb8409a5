"""norm_act: normalization followed by an activation, fused (Conv → norm → activation)."""

from __future__ import annotations

import torch

from ..core.checks import InputError
from .fused_args import activation_args
from .per_sample import _group_norm
from .tracked import _batch_norm

__all__ = ["norm_act"]


def norm_act(
    input: torch.Tensor,
    norm: str = "batch",
    *,
    num_groups: int | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    activation: str = "relu",
    activation_param: float | None = None,
    prelu_weight: torch.Tensor | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    r"""``activation(norm(input))`` in one fused pass, for ``norm`` "batch" or "group".

    See :func:`batch_norm_act` and :func:`group_norm_act` (which this calls) for the
    activations — relu, leaky_relu, elu, prelu, silu, identity — and the in-place mode.

    Args:
        input: (N, C, \*spatial).
        norm: "batch" (default) or "group".
        num_groups: keyword-only; G, required for "group".
        running_mean, running_var, training, momentum: keyword-only; for "batch", as for
            :func:`batch_norm` (note the default ``training=True`` here).
        weight, bias, eps: keyword-only, as for :func:`batch_norm`.
        activation, activation_param, prelu_weight, inplace: keyword-only, as for
            :func:`batch_norm_act`.

    Returns:
        The output, the input's shape and dtype.

    Raises:
        ValueError: an unknown ``norm``, "group" without ``num_groups``, and the errors of
            the norm it calls.
    """
    if norm == "batch":
        act = activation_args(input, activation, activation_param, prelu_weight, inplace)
        estimates = (running_mean, running_var, None, momentum, True, "skip")
        return _batch_norm("batch_norm_act", input, weight, bias, training, eps, estimates, None, act)
    if norm == "group":
        if num_groups is None:
            raise InputError("norm_act with norm='group' needs num_groups")
        act = activation_args(input, activation, activation_param, prelu_weight, inplace)
        return _group_norm(input, num_groups, weight, bias, eps, None, "group_norm_act", act)
    raise InputError(f"norm must be 'batch' or 'group', got {norm!r}")
