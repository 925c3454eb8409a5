"""Checks of the learned tensors the norms beyond the classic five take: scalars and affine
parameters that broadcast along the trailing dims or along dim 1."""

from __future__ import annotations

import torch

from ..core import compute_dtype
from ..core.checks import InputError, InputTypeError, check_param_kind

__all__ = ["affine_view", "check_kind", "scalar_param"]


def check_kind(param: torch.Tensor, name: str, input: torch.Tensor, fn: str) -> None:
    """Floating point, on the input's device, and of the input's dtype (float32 parameters are
    accepted with float16/bfloat16 inputs, as everywhere in normlab)."""
    check_param_kind(param, name, input, prefix=f"{fn}: ")


def scalar_param(value: object, name: str, input: torch.Tensor, fn: str) -> torch.Tensor:
    """A learned scalar (a float, or a tensor of one element) as a tensor on the input's device."""
    if isinstance(value, bool) or not isinstance(value, (torch.Tensor, int, float)):
        raise InputTypeError(f"{fn}: {name} must be a float or a one-element tensor, got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), dtype=compute_dtype(input.dtype), device=input.device)
    if value.numel() != 1:
        raise InputError(f"{fn}: {name} must hold one value (a learned scalar), got shape {tuple(value.shape)}")
    check_kind(value, name, input, fn)
    return value


def affine_view(
    param: torch.Tensor | None, name: str, input: torch.Tensor, channels_last: bool, fn: str
) -> torch.Tensor | None:
    """``param`` shaped to broadcast against ``input``: as the input's trailing dims
    (``channels_last``), or (C,) along dim 1 of an (N, C, *spatial) input."""
    if param is None:
        return None
    if not isinstance(param, torch.Tensor):
        raise InputTypeError(f"{fn}: {name} must be a torch.Tensor or None, got {type(param).__name__}")
    if channels_last:
        if param.dim() == 0 or param.dim() > input.dim() or param.shape != input.shape[input.dim() - param.dim() :]:
            raise InputError(
                f"{fn}: {name} has shape {tuple(param.shape)} but must equal the input's trailing dims "
                f"(input shape {tuple(input.shape)}); for a per-channel {name} of an (N, C, *spatial) input "
                f"pass channels_last=False"
            )
        view = param
    else:
        channels = input.shape[1] if input.dim() >= 2 else None
        if channels is None or param.dim() != 1 or param.shape[0] != channels:
            raise InputError(
                f"{fn}: {name} must have shape (C,) for the channels of dim 1 of an (N, C, *spatial) input, "
                f"got {name} of shape {tuple(param.shape)} and input of shape {tuple(input.shape)}"
            )
        view = param.view((-1,) + (1,) * (input.dim() - 2))
    check_kind(param, name, input, fn)
    return view
