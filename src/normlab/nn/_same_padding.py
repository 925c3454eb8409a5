"""TensorFlow's "SAME" padding for the standardized convolutions, as timm computes it.

Symmetric padding ``((stride − 1) + dilation·(k − 1)) // 2`` is the default. "same" keeps the
output at ⌈input / stride⌉: a fixed symmetric padding where stride 1 and an odd dilated kernel
allow it, else padding computed from each input's size, the extra pixel on the right and
bottom (TensorFlow's rule, which timm's ``*Same`` layers follow).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union, cast

import torch
import torch.nn.functional as F

from ..core.checks import InputError

__all__ = ["default_padding", "pad_same", "padding_value"]

#: a convolution's kernel size, stride or dilation: one int for both dims, or one per dim
#: (``nn.Conv2d`` keeps a tuple)
_Size = Union[int, tuple[int, ...], list[int]]


def _pairs(*values: _Size) -> list[Sequence[int]]:
    return [v if isinstance(v, (tuple, list)) else (v, v) for v in values]


def default_padding(kernel_size: _Size, stride: _Size, dilation: _Size) -> tuple[int, int]:
    """timm's symmetric padding for each spatial dim."""
    k, s, d = _pairs(kernel_size, stride, dilation)
    # one per spatial dim: two for the 2-D convolutions here
    return cast("tuple[int, int]", tuple(((si - 1) + di * (ki - 1)) // 2 for ki, si, di in zip(k, s, d)))


def padding_value(
    padding: int | tuple[int, int] | str | None, kernel_size: _Size, stride: _Size, dilation: _Size
) -> tuple[int | tuple[int, int] | str, bool]:
    """(padding for ``nn.Conv2d``, whether it is computed per input): None is the symmetric
    default; "same" fixed where possible, else dynamic; "valid" 0; ints and pairs as given."""
    if padding is None:
        return default_padding(kernel_size, stride, dilation), False
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return 0, False
        if mode != "same":
            raise InputError(f"padding must be an int, a pair, None, 'same' or 'valid', got {padding!r}")
        k, s, d = _pairs(kernel_size, stride, dilation)
        static = all(si == 1 and (di * (ki - 1)) % 2 == 0 for ki, si, di in zip(k, s, d))
        if static:
            return default_padding(kernel_size, stride, dilation), False
        return 0, True
    return padding, False


def _same_amount(size: int, k: int, s: int, d: int) -> int:
    return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)


def pad_same(x: torch.Tensor, kernel_size: _Size, stride: _Size, dilation: _Size) -> torch.Tensor:
    """Zero-pad the last two dims of ``x`` so that the convolution's output is ⌈size / stride⌉."""
    (kh, kw), (sh, sw), (dh, dw) = _pairs(kernel_size, stride, dilation)
    ih, iw = x.shape[-2:]
    pad_h = _same_amount(ih, kh, sh, dh)
    pad_w = _same_amount(iw, kw, sw, dw)
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
