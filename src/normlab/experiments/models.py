"""Small models with a pluggable normalization layer, built from normlab.nn."""

from __future__ import annotations

import torch
from torch import nn

from .. import init as nlinit
from .. import nn as nln
from ..core import ACTIVATIONS

__all__ = [
    "ACTIVATION_KINDS",
    "INIT_SCHEMES",
    "MLP",
    "NORM_KINDS",
    "COLUMN_NORM_KINDS",
    "BasicBlock",
    "ColumnConvNet",
    "ConvNet1d",
    "ResNet18",
    "init_linear_",
    "make_activation",
    "make_norm",
    "make_norm_act",
]

#: The kinds ``make_norm`` builds, named as ``surgery.convert_norms`` names its targets.
NORM_KINDS = ("batch", "group", "layer", "instance", "none", "batch_renorm")
_ALIASES = {"renorm": "batch_renorm"}  # the earlier spelling, still accepted


def make_norm(
    kind: str, channels: int, *, dims: int = 1, groups: int = 8, renorm_schedule: nln.RenormSchedule | None = None
) -> nn.Module:
    """The normalization layer ``kind`` for ``channels`` channels of a ``dims``-D conv.

    ``"layer"`` is GroupNorm with one group (LayerNorm over (C, *spatial) with
    per-channel affine, the form the GroupNorm paper compares); ``"instance"`` is
    InstanceNorm with affine, as in that paper; ``"batch_renorm"`` (or ``"renorm"``) is
    BatchRenorm with ``renorm_schedule`` (default: r_max 3, d_max 5 from the start).
    """
    kind = _ALIASES.get(kind, kind)
    if kind == "batch":
        return {1: nln.BatchNorm1d, 2: nln.BatchNorm2d, 3: nln.BatchNorm3d}[dims](channels)
    if kind == "batch_renorm":
        cls = {1: nln.BatchRenorm1d, 2: nln.BatchRenorm2d, 3: nln.BatchRenorm3d}[dims]
        return cls(channels, schedule=renorm_schedule or nln.RenormSchedule())
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

    def __init__(
        self,
        norm: str = "batch",
        width: int = 32,
        depth: int = 3,
        num_classes: int = 10,
        in_channels: int = 1,
        groups: int = 8,
        renorm_schedule: nln.RenormSchedule | None = None,
    ) -> None:
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(depth):
            # A conv followed by a norm with β needs no bias of its own.
            layers += [
                nn.Conv1d(channels, width, 3, padding=1, stride=2 if i else 1, bias=norm == "none"),
                make_norm(norm, width, dims=1, groups=groups, renorm_schedule=renorm_schedule),
                nn.ReLU(inplace=True),
            ]
            channels = width
        layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, num_classes)]
        super().__init__(*layers)


#: The norms normlab has for 2-D inputs only, which :class:`ColumnConvNet` runs in the 1-D CNN:
#: FRN + TLU, EvoNorm-B0, EvoNorm-S0 and GroupNorm with standardized convolutions (named as
#: ``surgery.convert_norms`` names them), and Switchable Norm.
COLUMN_NORM_KINDS = ("frn", "evonorm_b0", "evonorm_s0", "group_ws", "switchable")


def make_norm_act(kind: str, channels: int, *, groups: int = 8) -> list[nn.Module]:
    """The layers that follow a convolution for norm ``kind`` on (N, C, H, W) inputs: the norm
    and the nonlinearity after it.

    As the papers pair them: FRN is followed by its TLU (``FilterResponseNormTlu2d``, which
    replaces the ReLU), EvoNorm-B0 and -S0 hold their own nonlinearity (they replace BN + ReLU),
    and every other norm — Switchable Norm, the GroupNorm of ``"group_ws"`` (whose convolutions
    :class:`ColumnConvNet` standardizes) and :data:`NORM_KINDS` — is followed by a ReLU.
    EvoNorm-S0 uses ``groups`` groups, as GroupNorm does.
    """
    if kind == "frn":
        return [nln.FilterResponseNormTlu2d(channels)]
    if kind == "evonorm_b0":
        return [nln.EvoNormB0(channels)]
    if kind == "evonorm_s0":
        return [nln.EvoNormS0(channels, groups=min(groups, channels))]
    if kind == "switchable":
        norm = nln.SwitchableNorm2d(channels)
    elif kind == "group_ws":
        norm = nln.GroupNorm(min(groups, channels), channels)
    elif kind in NORM_KINDS or kind in _ALIASES:
        norm = make_norm(kind, channels, dims=2, groups=groups)
    else:
        raise ValueError(f"norm kind must be one of {NORM_KINDS + COLUMN_NORM_KINDS}, got {kind!r}")
    return [norm, nn.ReLU(inplace=True)]


class ColumnConvNet(nn.Sequential):
    """:class:`ConvNet1d` computed with 2-D layers, for the norms normlab has only in 2-D.

    The signal (N, C, L) is viewed as an image (N, C, L, 1) and each Conv1d(k=3, padding 1,
    stride s) becomes a Conv2d with a (3, 1) kernel, padding (1, 0) and stride (s, 1) — the
    same function, and from the same seed the same initial weights (the two weights have the
    same fan-in and number of elements), so its rows stand beside ConvNet1d's. ``norm`` is any
    of :data:`NORM_KINDS` or :data:`COLUMN_NORM_KINDS` (see :func:`make_norm_act`);
    ``"group_ws"`` makes every convolution a :class:`normlab.nn.StdConv2d`.
    """

    def __init__(
        self,
        norm: str = "frn",
        width: int = 32,
        depth: int = 3,
        num_classes: int = 10,
        in_channels: int = 1,
        groups: int = 8,
    ) -> None:
        conv = nln.StdConv2d if norm == "group_ws" else nn.Conv2d
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(depth):
            layers.append(conv(channels, width, (3, 1), stride=(2 if i else 1, 1), padding=(1, 0), bias=norm == "none"))
            layers += make_norm_act(norm, width, groups=groups)
            channels = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
        super().__init__(*layers)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input.unsqueeze(-1))  # (N, C, L) → (N, C, L, 1)


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
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False), norm_layer(channels))

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

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3, norm_layer=nn.BatchNorm2d) -> None:
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


ACTIVATION_KINDS = tuple(ACTIVATIONS)


def make_activation(kind: str, width: int) -> nn.Module:
    """A fresh activation module with its default parameter; PReLU gets one learnable
    slope per unit."""
    if kind not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATION_KINDS}, got {kind!r}")
    return ACTIVATIONS[kind].make_module(channels=width)


#: Weight initializations for the MLP studies (biases start at 0 in every scheme but "torch").
INIT_SCHEMES = ("torch", "normal", "xavier", "xavier_relu", "he", "he_scaled")


def init_linear_(
    layer: nn.Linear, scheme: str, *, std: float = 0.01, scale: float = 1.0, generator: torch.Generator | None = None
) -> nn.Linear:
    """Initialize one Linear layer.

    ``torch``: torch.nn's default (U[±1/√fan_in], i.e. std 1/√(3·fan_in)); ``normal``:
    N(0, std²); ``xavier``: Glorot's normal form with gain 1 (right for tanh);
    ``xavier_relu``: the same with ReLU's gain √2 — Xavier "adapted" to ReLU, still
    averaging the fans; ``he``: N(0, 2/fan_in); ``he_scaled``: He times ``scale`` (a
    deliberately exploding init for scale > 1).
    """
    if scheme == "torch":
        return layer
    w = layer.weight
    if scheme == "normal":
        with torch.no_grad():
            w.normal_(0.0, std, generator=generator)
    elif scheme == "xavier":
        nlinit.xavier_normal_(w, activation="tanh", generator=generator)
    elif scheme == "xavier_relu":
        nlinit.xavier_normal_(w, activation="relu", generator=generator)
    elif scheme in ("he", "he_scaled"):
        nlinit.he_normal_(w, activation="relu", generator=generator)
        if scheme == "he_scaled":
            with torch.no_grad():
                w.mul_(scale)
    else:
        raise ValueError(f"init scheme must be one of {INIT_SCHEMES}, got {scheme!r}")
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.zero_()
    return layer


class MLP(nn.Module):
    """``in_features`` → [Linear → norm → activation] per width → optional Linear head.

    ``norm``: "batch" (BatchNorm1d, before the activation as in Ioffe & Szegedy), "layer"
    (LayerNorm) or "none". Hidden blocks are ``self.blocks[i]`` with children ``linear``,
    ``norm`` and ``act``, so studies can hook any of them. The head, when present, gets
    Xavier init whatever ``init`` says, so that init studies vary only the hidden layers.
    """

    def __init__(
        self,
        in_features: int,
        widths,
        num_classes: int | None = 10,
        *,
        activation: str = "relu",
        norm: str = "none",
        init: str = "torch",
        init_std: float = 0.01,
        init_scale: float = 1.0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if norm not in ("batch", "layer", "none"):
            raise ValueError(f"MLP norm must be 'batch', 'layer' or 'none', got {norm!r}")
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.blocks = nn.ModuleList()
        previous = in_features
        for width in widths:
            block = nn.Module()
            block.linear = init_linear_(
                nn.Linear(previous, width, bias=norm == "none"),
                init,
                std=init_std,
                scale=init_scale,
                generator=generator,
            )
            block.norm = {
                "batch": lambda w=width: nln.BatchNorm1d(w),
                "layer": lambda w=width: nln.LayerNorm(w),
                "none": nn.Identity,
            }[norm]()
            block.act = make_activation(activation, width)
            self.blocks.append(block)
            previous = width
        self.head = None
        if num_classes is not None:
            self.head = nn.Linear(previous, num_classes)
            nlinit.xavier_normal_(self.head.weight, activation="linear", generator=generator)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for block in self.blocks:
            x = block.act(block.norm(block.linear(x)))
        return x if self.head is None else self.head(x)

    @property
    def depth(self) -> int:
        return len(self.blocks)
