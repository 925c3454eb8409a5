"""Gains: the factor an initializer multiplies its base standard deviation by, per activation.

The sources, and the one place people get them backwards:

* **Glorot & Bengio (2010)** derive W ~ U[−√6/√(n_in+n_out), +√6/√(n_in+n_out)] for
  **tanh**, whose slope at 0 is 1: in its linear regime tanh passes variance unchanged,
  so the tanh gain is **1**. **Sigmoid** has slope 1/4 at 0, so it needs a **4×** larger
  bound (gain 4) to pass the same variance. A widely copied table puts the 4 on tanh and 1
  on sigmoid — that is swapped.
* **He et al. (2015)**: a ReLU zeroes half its input, so Var(w) = 2/n_in keeps the variance
  of the pre-activations constant: gain **√2**. LeakyReLU with slope a: **√(2/(1+a²))**.
* **torch.nn.init.calculate_gain** uses **5/3 for tanh** (not 1): an empirical value chosen
  so that repeated tanh layers settle at a healthy activation scale instead of shrinking
  (tanh compresses large inputs, so gain 1 loses variance layer after layer). For sigmoid
  it returns 1, i.e. no correction at all, not Glorot's 4×. It agrees on relu √2 and
  leaky_relu √(2/(1+a²)), and uses 3/4 for SELU.

normlab's ``convention="glorot"`` (default) follows the derivations above;
``convention="torch"`` reproduces ``calculate_gain`` exactly.
"""

from __future__ import annotations

import math

from ..core import InputError, InputTypeError

__all__ = ["ACTIVATIONS", "gain"]

# torch.nn.init.calculate_gain's names for the linear maps it defines (gain 1).
_LINEAR_NAMES = (
    "linear",
    "identity",
    "conv",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
)

#: The activation names :func:`gain` knows (torch's ``calculate_gain`` names, plus a few).
ACTIVATIONS = (
    *_LINEAR_NAMES,
    "tanh",
    "sigmoid",
    "relu",
    "leaky_relu",
    "elu",
    "selu",
    "gelu",
    "silu",
)


def gain(activation: str | None = "linear", param: float | None = None, *, convention: str = "glorot") -> float:
    """The gain for ``activation`` (``param`` is LeakyReLU's negative slope, default 0.01;
    no other activation takes one). ``None`` means no activation: gain 1.

    ======================  ================  ===============  ==========================
    activation              glorot (default)  torch            source
    ======================  ================  ===============  ==========================
    linear, identity, conv  1                 1                —
    (conv1d … conv3d, conv_transpose1d … conv_transpose3d: torch's names, also 1)
    tanh                    1                 5/3              Glorot & Bengio 2010 / torch
    sigmoid                 4                 1                slope 1/4 at 0 / torch
    relu                    √2                √2               He et al. 2015
    leaky_relu (slope a)    √(2/(1+a²))       √(2/(1+a²))      He et al. 2015
    elu, gelu, silu         √2                (not defined)    treated as ReLU-like
    selu                    1                 3/4              Klambauer et al. 2017 / torch
    ======================  ================  ===============  ==========================

    Args:
        activation: a name from :data:`ACTIVATIONS` (any case), or None. Default "linear".
        param: LeakyReLU's negative slope; refused for any other activation. Default None.
        convention: keyword-only; "glorot" (default) or "torch" (``calculate_gain``'s).

    Returns:
        The gain, a float.

    Raises:
        ValueError: an unknown activation or convention, a slope for another activation,
            or with ``convention="torch"`` an activation torch defines no gain for.
        TypeError: an activation that is not a string, a slope that is not a number.
    """
    if convention not in ("glorot", "torch"):
        raise InputError(f"convention must be 'glorot' or 'torch', got {convention!r}")
    if activation is None:
        activation = "linear"
    if not isinstance(activation, str):
        raise InputTypeError(f"activation must be a name such as 'relu' or None, got {type(activation).__name__}")
    name = activation.lower()
    if name not in ACTIVATIONS:
        raise InputError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if param is not None and name != "leaky_relu":
        raise InputError(
            f"a negative slope (param / negative_slope) applies to 'leaky_relu' only; {activation!r} takes "
            f"none (got {param!r}): pass activation='leaky_relu' or leave it out"
        )
    if name in _LINEAR_NAMES:
        return 1.0
    if name == "tanh":
        return 5.0 / 3.0 if convention == "torch" else 1.0
    if name == "sigmoid":
        return 1.0 if convention == "torch" else 4.0
    if name == "relu":
        return math.sqrt(2.0)
    if name == "leaky_relu":
        if param is not None and (isinstance(param, bool) or not isinstance(param, (int, float))):
            raise InputTypeError(f"LeakyReLU's negative slope must be a number, got {param!r}")
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1.0 + slope**2))
    if name == "selu":
        return 0.75 if convention == "torch" else 1.0
    if convention == "torch":
        raise InputError(f"torch.nn.init.calculate_gain defines no gain for {activation!r}")
    return math.sqrt(2.0)  # elu, gelu, silu: ReLU-like for positive inputs
