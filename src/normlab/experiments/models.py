"""Small models with a pluggable normalization layer, built from normlab.nn."""

from __future__ import annotations

from torch import nn

from .. import nn as nln

__all__ = ["NORM_KINDS", "ConvNet1d", "make_norm"]

NORM_KINDS = ("batch", "group", "layer", "instance", "none")


def make_norm(kind: str, channels: int, *, dims: int = 1, groups: int = 8) -> nn.Module:
    """The normalization layer ``kind`` for ``channels`` channels of a ``dims``-D conv.

    ``"layer"`` is GroupNorm with one group (LayerNorm over (C, *spatial) with
    per-channel affine, the form the GroupNorm paper compares); ``"instance"`` is
    InstanceNorm with affine, as in that paper.
    """
    if kind == "batch":
        return {1: nln.BatchNorm1d, 2: nln.BatchNorm2d, 3: nln.BatchNorm3d}[dims](channels)
    if kind == "group":
        return nln.GroupNorm(min(groups, channels), channels)
    if kind == "layer":
        return nln.GroupNorm(1, channels)
    if kind == "instance":
        cls = {1: nln.InstanceNorm1d, 2: nln.InstanceNorm2d, 3: nln.InstanceNorm3d}[dims]
        return cls(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm kind must be one of {NORM_KINDS}, got {kind!r}")


class ConvNet1d(nn.Sequential):
    """``depth`` × [Conv1d(width, 3) → norm → ReLU] → global average → Linear.

    The MNIST-1D CNN of the quick CPU probe in the references: small enough to train
    in seconds, deep enough for the norm layer to matter.
    """

    def __init__(self, norm: str = "batch", width: int = 32, depth: int = 3,
                 num_classes: int = 10, in_channels: int = 1, groups: int = 8) -> None:
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(depth):
            # A conv followed by a norm with β needs no bias of its own.
            layers += [
                nn.Conv1d(channels, width, 3, padding=1, stride=2 if i else 1,
                          bias=norm == "none"),
                make_norm(norm, width, dims=1, groups=groups),
                nn.ReLU(inplace=True),
            ]
            channels = width
        layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, num_classes)]
        super().__init__(*layers)
