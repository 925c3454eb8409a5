"""Type aliases for the public signatures: the argument types torch.nn's constructors accept."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict, Union

import torch

__all__ = ["ActLayer", "DeviceLike", "DTypeLike", "FactoryKwargs", "ShapeLike"]

#: where a module's parameters and buffers are created, as ``torch.empty(device=...)`` accepts.
DeviceLike = Union[torch.device, str, int, None]
#: a parameter dtype, or None for torch's default.
DTypeLike = Union[torch.dtype, None]
#: ``normalized_shape``: one int or a sequence of them (a list, a tuple, a ``torch.Size``).
ShapeLike = Union[int, Sequence[int]]
#: an activation given as timm's ``act_layer``: a module class, an instance (copied), or None.
ActLayer = Union[type[torch.nn.Module], torch.nn.Module, None]


class FactoryKwargs(TypedDict):
    """``device`` and ``dtype`` as one mapping, passed on with ``**`` to torch's tensor
    factories and to layers' constructors (torch.nn's ``factory_kwargs``)."""

    device: DeviceLike
    dtype: DTypeLike
