# mypy: disable-error-code="untyped-decorator,no-untyped-def"
# (every function here is a @triton.jit kernel: triton ships no types, and a kernel's
# parameters are Triton pointers, blocks and constexprs, which no Python annotation describes)
"""The fused activations in Triton: forward, derivative, and (for the in-place mode) the
inverse and the derivative read from the output.

``ACT`` is the activation's code in :data:`normlab.core.activation.ACTIVATIONS`, a
``tl.constexpr``: each kernel is compiled for one activation, and the branches below are
resolved at compile time. ``param`` is LeakyReLU's slope or ELU's alpha; ``slope`` is
PReLU's per-channel weight (ignored by the others). All arithmetic is float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...activation import ACTIVATIONS, FUSED_ACTIVATIONS
from ._runtime import INTERPRETED

_ROUND_BF16_BY_HAND: tl.constexpr = tl.constexpr(INTERPRETED)

# The codes the kernels below switch on; checked against the registry on import.
_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "elu": 3, "silu": 4, "prelu": 5}
#: PReLU's code, for host code
PRELU_CODE = _CODES["prelu"]
#: the same, for kernels (a jit function reads only globals made ``tl.constexpr``)
PRELU = tl.constexpr(PRELU_CODE)
if {name: ACTIVATIONS[name].code for name in FUSED_ACTIVATIONS} != _CODES:
    raise ImportError(
        f"normlab's Triton kernels know the activations {_CODES}, but the registry's fused "
        f"activations are { ({name: ACTIVATIONS[name].code for name in FUSED_ACTIVATIONS}) }; "
        "add the new activation to normlab/core/kernels/triton/activation.py"
    )


@triton.jit
def act_forward(z, param, slope, ACT: tl.constexpr):
    """act(z)."""
    if ACT == 1:
        return tl.where(z < 0, 0.0, z)  # keeps NaN, as torch's relu (tl.maximum drops it)
    elif ACT == 2:
        return tl.where(z > 0, z, z * param)
    elif ACT == 3:
        # expm1 keeps ELU's small negative outputs accurate, as torch's kernel does; the
        # minimum keeps NaN (by default it returns the other operand, so NaN became 0)
        return tl.where(z > 0, z, param * _expm1(tl.minimum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)))
    elif ACT == 4:
        return z / (1.0 + tl.exp(-z))
    elif ACT == 5:
        return tl.where(z > 0, z, z * slope)
    else:
        return z


@triton.jit
def act_grad(z, param, slope, ACT: tl.constexpr):
    """act'(z) (at 0 the left derivative, as torch's backward kernels take it)."""
    if ACT == 1:
        return tl.where(z <= 0, 0.0, 1.0)  # passes the gradient at a NaN, as torch's relu backward
    elif ACT == 2:
        return tl.where(z > 0, 1.0, param)
    elif ACT == 3:
        return tl.where(z > 0, 1.0, param * tl.exp(tl.minimum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)))
    elif ACT == 4:
        sig = 1.0 / (1.0 + tl.exp(-z))
        return sig * (1.0 + z * (1.0 - sig))
    elif ACT == 5:
        return tl.where(z > 0, 1.0, slope)
    else:
        # not z·0 + 1, which is NaN where z is: dy passes through unchanged, as torch's
        return tl.zeros_like(z) + 1.0


@triton.jit
def act_inverse(y, param, ACT: tl.constexpr):
    """z = act⁻¹(y) for the invertible ones (identity, LeakyReLU, ELU)."""
    if ACT == 2:
        return tl.where(y > 0, y, y / param)
    elif ACT == 3:
        return tl.where(y > 0, y, _log1p(tl.maximum(y / param, -1.0)))
    else:
        return y


@triton.jit
def act_grad_from_output(y, param, ACT: tl.constexpr):
    """act'(z) from y = act(z), for the invertible ones."""
    if ACT == 2:
        return tl.where(y > 0, 1.0, param)
    elif ACT == 3:
        return tl.where(y > 0, 1.0, y + param)
    else:
        return tl.zeros_like(y) + 1.0  # not y·0 + 1 (NaN where y is)


@triton.jit
def _expm1(z):
    # exp(z) − 1 loses every digit for |z| < 1e-3; the Taylor terms up to z⁴ are exact to
    # float32 there (the next term is below 1e-16)
    small = tl.abs(z) < 1e-3
    taylor = z * (1.0 + z * (0.5 + z * (1.0 / 6.0 + z * (1.0 / 24.0))))
    return tl.where(small, taylor, tl.exp(z) - 1.0)


@triton.jit
def _log1p(u):
    # log(1 + u) for u in [-1, 0]: Taylor near 0, where 1 + u rounds away u's digits
    small = tl.abs(u) < 1e-3
    taylor = u * (1.0 - u * (0.5 - u * (1.0 / 3.0 - u * 0.25)))
    return tl.where(small, taylor, tl.log(1.0 + u))


@triton.jit
def cast_to(v, dtype: tl.constexpr):
    """``v`` (float32) in ``dtype``, rounded to nearest even."""
    if dtype == tl.float32:
        return v
    elif dtype == tl.float64:
        return v.to(tl.float64)
    elif dtype == tl.bfloat16 and _ROUND_BF16_BY_HAND:
        # Triton's interpreter truncates float32 → bfloat16 where a GPU rounds: round the bits
        # here (NaN passes through the plain cast, whose payload survives truncation)
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return tl.where(v != v, v.to(dtype), rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True))
    else:
        return v.to(dtype)
