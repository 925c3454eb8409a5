"""Validation of user input, shared by every layer above the core.

Each check raises ``TypeError`` or ``ValueError`` with a message that names what was
expected, what arrived and, where there is one, the fix. ``assert`` is kept for internal
invariants only: it vanishes under ``python -O`` and must never guard user input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "LOW_PRECISION_DTYPES",
    "check_eps",
    "check_floating_input",
    "check_momentum",
    "check_param",
    "check_positive_int",
    "normalize_shape_arg",
]

#: dtypes whose statistics are accumulated in float32 (and whose parameters may be float32).
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


def check_floating_input(x: object, name: str = "input") -> torch.Tensor:
    """Return ``x`` if it is a floating-point tensor, else raise ``TypeError``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must have a floating-point dtype (float16, bfloat16, float32 or "
            f"float64), got {x.dtype}; convert it first, e.g. x.float()"
        )
    return x


def check_eps(eps: object, name: str = "eps") -> float:
    """``eps`` keeps the divisor away from zero: it must be a finite number > 0."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(eps).__name__} {eps!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(
            f"{name} must be a finite number > 0 (it keeps 1/sqrt(var + eps) finite for "
            f"constant inputs), got {eps!r}"
        )
    return float(eps)


def check_momentum(momentum: object, *, allow_none: bool) -> float | None:
    """PyTorch-convention momentum: the weight of the new batch, in [0, 1]."""
    if momentum is None:
        if allow_none:
            return None
        raise TypeError(
            "momentum=None (cumulative average) needs the count of batches seen, which "
            "only a module keeps; pass a float in [0, 1] here, e.g. 1 / (batches + 1)"
        )
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(
            f"momentum must be a float in [0, 1]{' or None' if allow_none else ''}, "
            f"got {type(momentum).__name__} {momentum!r}"
        )
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"momentum must lie in [0, 1] (new = (1 - momentum) * old + momentum * batch), "
            f"got {momentum!r}; a Keras/Flax 'decay' d converts to momentum 1 - d "
            f"(normlab.core.momentum_from_decay)"
        )
    return float(momentum)


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def normalize_shape_arg(shape: object, name: str = "normalized_shape") -> tuple[int, ...]:
    """Accept an int or a sequence of positive ints, as torch.nn.LayerNorm does."""
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, Sequence) or isinstance(shape, (str, bytes)):
        raise TypeError(
            f"{name} must be an int or a sequence of ints, got {type(shape).__name__}"
        )
    dims = tuple(shape)
    if len(dims) == 0:
        raise ValueError(f"{name} must name at least one dimension, got {dims}")
    for d in dims:
        check_positive_int(d, f"every entry of {name}")
    return dims


def check_param(
    param: torch.Tensor | None,
    name: str,
    expected_shape: tuple[int, ...],
    x: torch.Tensor,
    what: str,
) -> None:
    """Check an affine parameter or running statistic against the input.

    ``what`` says where the expected shape comes from, e.g. "the 64 channels of input
    dim 1", so the message tells the user which side to fix.
    """
    if param is None:
        return
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(param).__name__}")
    if tuple(param.shape) != tuple(expected_shape):
        raise ValueError(
            f"{name} has shape {tuple(param.shape)} but {what} needs shape "
            f"{tuple(expected_shape)} (input shape {tuple(x.shape)})"
        )
    if not param.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {param.dtype}")
    if param.device != x.device:
        raise ValueError(
            f"{name} is on {param.device} but the input is on {x.device}; move the "
            f"module or the input so they share a device"
        )
    mixed_precision = x.dtype in LOW_PRECISION_DTYPES and param.dtype == torch.float32
    if param.dtype != x.dtype and not mixed_precision:
        raise TypeError(
            f"{name} has dtype {param.dtype} but the input has dtype {x.dtype}; they must "
            f"match (float16/bfloat16 inputs may also use float32 parameters)"
        )
