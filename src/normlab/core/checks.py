"""Validation of user input, shared by every layer above the core.

Each check raises ``TypeError`` or ``ValueError`` with a message that names what was
expected, what arrived and, where there is one, the fix. ``assert`` is kept for internal
invariants only: it vanishes under ``python -O`` and must never guard user input.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Literal, NoReturn, cast, overload

import torch

__all__ = [
    "InputError",
    "InputTypeError",
    "LOW_PRECISION_DTYPES",
    "check_eps",
    "check_floating_input",
    "check_momentum",
    "check_param",
    "check_param_kind",
    "check_positive_int",
    "normalize_shape_arg",
]


class InputError(ValueError, RuntimeError):
    """A wrong value (shape, size, range) given to a normlab layer or functional.

    A ``ValueError`` — what it is — and a ``RuntimeError``, which is what torch raises for
    the same mistakes, so code written against torch.nn (``except RuntimeError``) catches it.
    """


class InputTypeError(TypeError, RuntimeError):
    """A wrong type given to a normlab layer or functional; also a ``RuntimeError``, as
    :class:`InputError` is."""


#: dtypes whose statistics are accumulated in float32 (and whose parameters may be float32).
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


def check_floating_input(x: object, name: str = "input") -> torch.Tensor:
    """Return ``x`` if it is a floating-point tensor, else raise ``TypeError``.

    Args:
        x: the value to check.
        name: what to call it in the message. Default "input".

    Returns:
        ``x``.

    Raises:
        TypeError: a non-tensor or a tensor of a non-floating dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputTypeError(
            f"{name} must have a floating-point dtype (float16, bfloat16, float32 or "
            f"float64), got {x.dtype}; convert it first, e.g. x.float()"
        )
    return x


def check_eps(eps: object, name: str = "eps") -> float:
    """``eps`` keeps the divisor away from zero: a finite number >= 0 (any real number type,
    NumPy's included). 0 is accepted as torch.nn accepts it; a constant group then divides
    by zero, as it does in torch.nn.

    Args:
        eps: the value to check.
        name: what to call it in the message. Default "eps".

    Returns:
        ``eps`` as a float.

    Raises:
        ValueError: a negative, NaN or infinite number.
        TypeError: not a real number (a bool, a string, a tensor).
    """
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise InputTypeError(f"{name} must be a non-negative float, got {type(eps).__name__} {eps!r}")
    # typeshed's numbers.Real declares < and <= only; a Real compares with 0 as a float does
    if not (math.isfinite(eps) and cast(float, eps) >= 0):
        raise InputError(
            f"{name} must be a finite number >= 0 (it keeps 1/sqrt(var + eps) finite for constant inputs), got {eps!r}"
        )
    return float(eps)


@overload
def check_momentum(momentum: None, *, allow_none: Literal[False]) -> NoReturn: ...


@overload
def check_momentum(momentum: object, *, allow_none: Literal[False]) -> float: ...


@overload
def check_momentum(momentum: object, *, allow_none: bool) -> float | None: ...


def check_momentum(momentum: object, *, allow_none: bool) -> float | None:
    """PyTorch-convention momentum: the weight of the new batch, in [0, 1].

    Args:
        momentum: the value to check (``docs/conventions.md#running-statistics``).
        allow_none: keyword-only; accept None (the cumulative average).

    Returns:
        ``momentum`` as a float, or None.

    Raises:
        ValueError: a number outside [0, 1] or NaN.
        TypeError: not a real number, or None where it is not allowed.
    """
    if momentum is None:
        if allow_none:
            return None
        raise InputTypeError(
            "momentum=None (cumulative average) needs the count of batches seen, which "
            "only a module keeps; pass a float in [0, 1] here, e.g. 1 / (batches + 1)"
        )
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise InputTypeError(
            f"momentum must be a float in [0, 1]{' or None' if allow_none else ''}, "
            f"got {type(momentum).__name__} {momentum!r}"
        )
    if not 0.0 <= cast(float, momentum) <= 1.0:  # a Real compares as a float does (see check_eps)
        raise InputError(
            f"momentum must lie in [0, 1] (new = (1 - momentum) * old + momentum * batch), "
            f"got {momentum!r}; a Keras/Flax 'decay' d converts to momentum 1 - d "
            f"(normlab.core.momentum_from_decay)"
        )
    return float(momentum)


def check_positive_int(value: object, name: str, *, allow_zero: bool = False) -> int:
    """A positive int (0 too with ``allow_zero``); NumPy integers are ints here.

    Args:
        value: the value to check.
        name: what to call it in the message.
        allow_zero: keyword-only; accept 0. Default False.

    Returns:
        ``value`` as an int.

    Raises:
        ValueError: a number below 1 (below 0 with ``allow_zero``).
        TypeError: not an integer (a bool, a float, a string).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"{name} must be a positive int, got {value}")
    return int(value)


def normalize_shape_arg(shape: object, name: str = "normalized_shape") -> tuple[int, ...]:
    """Accept an int or an iterable of ints >= 0 (a list, torch.Size, a NumPy array), as
    torch.nn.LayerNorm does; a 0 gives an empty output, as there.

    Args:
        shape: the value to check.
        name: what to call it in the message. Default "normalized_shape".

    Returns:
        The shape as a tuple of ints.

    Raises:
        ValueError: a negative size, or no dims at all.
        TypeError: not an int or an iterable of ints.
    """
    if not isinstance(shape, bool) and isinstance(shape, numbers.Integral):
        shape = (shape,)
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Iterable):
        raise InputTypeError(f"{name} must be an int or a sequence of ints, got {type(shape).__name__}")
    dims = tuple(check_positive_int(d, f"every entry of {name}", allow_zero=True) for d in shape)
    if len(dims) == 0:
        raise InputError(f"{name} must name at least one dimension, got {dims}")
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

    Args:
        param: the tensor to check, or None (nothing to check).
        name: what to call it in the message ("weight", "running_mean", ...).
        expected_shape: the shape it must have.
        x: the input, whose device and floating dtype it must match.
        what: where ``expected_shape`` comes from, in words.

    Raises:
        ValueError: another shape or device.
        TypeError: a non-tensor, or a non-floating dtype.
    """
    if param is None:
        return
    if not isinstance(param, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor or None, got {type(param).__name__}")
    if tuple(param.shape) != tuple(expected_shape):
        raise InputError(
            f"{name} has shape {tuple(param.shape)} but {what} needs shape "
            f"{tuple(expected_shape)} (input shape {tuple(x.shape)})"
        )
    check_param_kind(param, name, x)


def check_param_kind(param: torch.Tensor, name: str, x: torch.Tensor, prefix: str = "") -> None:
    """Floating point, on the input's device, and of the input's dtype (float32 parameters
    are accepted with float16/bfloat16 inputs, as everywhere in normlab); ``prefix`` starts
    each message (a functional's name)."""
    if not param.is_floating_point():
        raise InputTypeError(f"{prefix}{name} must be floating point, got {param.dtype}")
    if param.device != x.device:
        raise InputError(
            f"{prefix}{name} is on {param.device} but the input is on {x.device}; move the "
            f"module or the input so they share a device"
        )
    mixed_precision = x.dtype in LOW_PRECISION_DTYPES and param.dtype == torch.float32
    if param.dtype != x.dtype and not mixed_precision:
        raise InputTypeError(
            f"{prefix}{name} has dtype {param.dtype} but the input has dtype {x.dtype}; they must "
            f"match (float16/bfloat16 inputs may also use float32 parameters)"
        )
