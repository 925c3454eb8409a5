"""The models ``normlab bench models`` times, written with torch.nn (the normlab side is
derived from each by surgery): a ResNet-style CNN, a ViT-style transformer, an MLP."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import nn

__all__ = ["NUM_CLASSES", "MLPStyle", "ResNetStyle", "ViTStyle"]

NUM_CLASSES = 10


def _norm_relu(norm: nn.Module) -> nn.Sequential:
    """norm → ReLU, as one module so the fused row can swap the pair for BatchNormAct2d."""
    return nn.Sequential(norm, nn.ReLU(inplace=True))


class _Block(nn.Module):
    """ResNet's basic block: conv → norm → ReLU → conv → norm, + shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm_relu(norm(cout))
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = norm(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        return F.relu(self.norm2(self.conv2(self.norm1(self.conv1(x)))) + self.shortcut(x))


class ResNetStyle(nn.Sequential):
    """A 3×3 stem and two stages of two basic blocks at widths w and 2w (the second at half
    resolution), global average pooling and a linear head: 10 norm layers."""

    def __init__(self, norm: Callable[[int], nn.Module], width: int = 32) -> None:
        super().__init__(
            nn.Conv2d(3, width, 3, 1, 1, bias=False),
            _norm_relu(norm(width)),
            _Block(width, width, 1, norm),
            _Block(width, width, 1, norm),
            _Block(width, 2 * width, 2, norm),
            _Block(2 * width, 2 * width, 1, norm),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, NUM_CLASSES),
        )


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class _ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.norm1, self.attn = norm(dim), _Attention(dim, heads)
        self.norm2 = norm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTStyle(nn.Module):
    """Transformer blocks over a token sequence (a ViT without its patch embedding: the
    input is the tokens), a final norm, and a linear head on the first (class) token."""

    def __init__(self, norm: Callable[[int], nn.Module], dim: int = 192, depth: int = 4, heads: int = 3) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[_ViTBlock(dim, heads, norm) for _ in range(depth)])
        self.norm = norm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x):
        return self.head(self.norm(self.blocks(x))[:, 0])


class MLPStyle(nn.Sequential):
    """Linear → BatchNorm1d → ReLU, twice, and a linear head."""

    def __init__(self, features: int = 256, hidden: int = 512) -> None:
        super().__init__(
            nn.Linear(features, hidden, bias=False),
            _norm_relu(nn.BatchNorm1d(hidden)),
            nn.Linear(hidden, hidden, bias=False),
            _norm_relu(nn.BatchNorm1d(hidden)),
            nn.Linear(hidden, NUM_CLASSES),
        )
