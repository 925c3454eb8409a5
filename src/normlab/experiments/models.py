"""Small models with a pluggable normalization layer, built from normlab.nn."""

from __future__ import annotations

from torch import nn

from .. import nn as nln

__all__ = ["NORM_KINDS", "BasicBlock", "ConvNet1d", "ResNet18", "make_norm"]

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


class BasicBlock(nn.Module):
    """ResNet's basic block: conv3×3 → norm → ReLU → conv3×3 → norm, plus the shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int, norm_layer) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), norm_layer(channels)
            )

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out))
        return (out + self.shortcut(x)).relu()


class ResNet18(nn.Module):
    """ResNet-18 (He et al., 2016) in its CIFAR form: a 3×3 stem, four stages of two
    basic blocks at widths w, 2w, 4w, 8w, global average pooling and a linear head.

    ``norm_layer`` defaults to torch.nn.BatchNorm2d so that the fold benchmark measures
    torch.nn; pass a normlab layer (or ``lambda c: make_norm("group", c, dims=2)``) to
    swap it.
    """

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3,
                 norm_layer=nn.BatchNorm2d) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), norm_layer(width), nn.ReLU(inplace=True)
        )
        blocks, channels = [], width
        for stage, out in enumerate([width, 2 * width, 4 * width, 8 * width]):
            for i in range(2):
                blocks.append(BasicBlock(channels, out, 2 if stage and i == 0 else 1, norm_layer))
                channels = out
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean((2, 3)))
