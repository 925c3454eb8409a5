"""The networks the regularization studies share: the MNIST-1D CNN and MLP with dropout.

Dropout's place matters with BatchNorm (the ``dropout-order`` study), so the CNN takes it
as an argument:

- ``"relu"`` — Conv → BN → ReLU → Dropout in every block: the order usually taught. Each
  block's dropout feeds the next block's conv and BatchNorm, so every BN but the first sees
  dropped-out inputs in training and whole ones at test time.
- ``"norm"`` — Conv → Dropout → BN → ReLU: dropout directly before each BN.
- ``"head"`` — Conv → BN → ReLU blocks with one dropout after the last block, before the
  classifier: no BatchNorm sees a dropped-out input (Li et al., 2019, remedy 1).
"""

from __future__ import annotations

from torch import nn

from ..models import make_norm

__all__ = ["PLACEMENTS", "conv_net", "mlp"]

PLACEMENTS = ("relu", "norm", "head")


def conv_net(
    norm: str = "batch", dropout: float = 0.0, placement: str = "relu", *, width: int = 32, depth: int = 3
) -> nn.Sequential:
    """``depth`` × [Conv1d(width, 3) → norm → ReLU] → average → Linear, the ``batch-size``
    study's CNN, with dropout of rate ``dropout`` at ``placement`` (see the module doc)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = []
    channels = 1
    for i in range(depth):
        layers.append(nn.Conv1d(channels, width, 3, padding=1, stride=2 if i else 1, bias=norm == "none"))
        if dropout and placement == "norm":
            layers.append(nn.Dropout(dropout))
        layers += [make_norm(norm, width, dims=1), nn.ReLU()]
        if dropout and placement == "relu":
            layers.append(nn.Dropout(dropout))
        channels = width
    layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten()]
    if dropout and placement == "head":
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def mlp(norm: str = "batch", dropout: float = 0.0, widths: tuple[int, ...] = (100, 100, 100)) -> nn.Sequential:
    """[Linear → norm → ReLU → Dropout] per width → Linear, on the flattened MNIST-1D signal."""
    layers: list[nn.Module] = [nn.Flatten()]
    previous = 40
    for width in widths:
        layers += [nn.Linear(previous, width, bias=norm == "none"), make_norm(norm, width, dims=1), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        previous = width
    layers.append(nn.Linear(previous, 10))
    return nn.Sequential(*layers)
