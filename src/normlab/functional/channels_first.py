"""layer_norm2d: LayerNorm over the channels of each position of an (N, C, H, W) tensor.

ConvNeXt's norm (timm's ``LayerNorm2d``, many detection and segmentation necks): the
statistics of position (n, h, w) are over its C channels, γ and β are per channel. timm
computes it as permute → ``layer_norm`` → permute, which copies an NCHW input twice (the
permuted view is not contiguous); here channels_last input is normalized in place of the
permute (its rows of C are contiguous already) and NCHW input by statistics over dim 1.
"""

from __future__ import annotations

import torch

from ..core import channels_first_row_norm, check_floating_input
from ..core.call_checks import check_row_args
from ..core.checks import InputError

__all__ = ["layer_norm2d"]


def layer_norm2d(
    input: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Layer normalization over dim 1 (channels) of an (N, C, H, W) ``input``.

    ``weight`` and ``bias`` have shape (C,). The output has the input's shape; its memory
    format is the input's for channels_last and NCHW-contiguous input. The default eps is
    timm's (1e-6), not torch.nn.LayerNorm's.

    Args:
        input: (N, C, H, W).
        weight: γ, shape (C,), or None. Default None.
        bias: β, shape (C,), or None. Default None.
        eps: added to the variance; a finite number >= 0. Default 1e-6.

    Returns:
        The normalized tensor, shape (N, C, H, W).

    Raises:
        ValueError: an input that is not 4D, parameters of the wrong shape, a bad ``eps``.
        TypeError: a non-tensor input or a non-floating dtype.
    """
    check_floating_input(input)
    if input.dim() != 4:
        raise InputError(
            f"layer_norm2d expects input of shape (N, C, H, W), got a {input.dim()}D tensor of shape "
            f"{tuple(input.shape)}; for channels-last (*, C) data use layer_norm(x, (C,))"
        )
    eps = check_row_args("layer_norm2d", input.permute(0, 2, 3, 1), (input.shape[1],), weight, bias, eps)
    return channels_first_row_norm(input, weight, bias, eps, operation="layer_norm2d", checked=True)
