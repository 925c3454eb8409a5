"""One call of a norm family, as the family's entry hands it to the path the rule chose.

:func:`normlab.core.channel.channel_norm` and :func:`normlab.core.row.row_norm` check a call,
ask the path rule once and pass the call on whole: the native ops (:mod:`normlab.core.native`),
the composed ops (:mod:`normlab.core.composed`), the kernels' operator and in-place mode, and
a GPU backend (:class:`normlab.core.kernels.KernelBackend`) each take one :class:`ChannelCall`
or :class:`RowCall` — the same arguments are not written out again in each of their
signatures. The kernels' direct path builds neither: that call goes from the entry straight
into C++.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

    from .activation import ActivationArgs
    from .running import RunningStats

__all__ = ["ChannelCall", "RowCall"]


class ChannelCall(NamedTuple):
    """A checked call of the channel family: BatchNorm (``groups=-1``) or GroupNorm
    (``groups=G``; InstanceNorm is G = C), masked or not, with a fused activation, in place
    or not. Immutable: a path that needs another input (a contiguous copy) takes it as a
    local. A NamedTuple rather than a frozen dataclass, whose ``__init__`` sets each field
    through ``object.__setattr__`` and costs several times as much to build (measured: 9.5
    against 2.2 µs), on every call off the kernels' direct path.

    Attributes:
        x: the (N, C, *spatial) input.
        weight: γ, shape (C,), or None.
        bias: β, shape (C,), or None.
        groups: -1 (BatchNorm) or G.
        eps: added to the variance.
        batch_stats: statistics from this batch (the ``running`` estimates, if any, updated
            exactly once by the path), or, when False, from ``running``'s estimates.
        running: the :class:`normlab.core.RunningStats` policy, or None.
        act: the fused activation as ``(name, param, prelu_weight)``.
        inplace: the output is written over ``x`` and only it kept for backward.
        mask: bool, True at valid positions, (N, *spatial); or None.
    """

    x: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    groups: int
    eps: float
    batch_stats: bool
    running: RunningStats | None
    act: ActivationArgs
    inplace: bool = False
    mask: torch.Tensor | None = None

    def running_count(self) -> int:
        """The count a running update is given: the values each batch statistic is over —
        N·spatial per channel for BatchNorm, spatial per (sample, channel) for InstanceNorm,
        the one grouping that keeps running estimates. The caller makes sure the input has
        channels (and, for InstanceNorm, samples)."""
        x = self.x
        return x.numel() // (x.shape[1] * (x.shape[0] if self.groups >= 0 else 1))


class RowCall(NamedTuple):
    """A checked call of the row family: LayerNorm (``centered``) or RMSNorm over the trailing
    ``normalized_shape`` dims of ``x``. Immutable, a NamedTuple as :class:`ChannelCall` is.

    Attributes:
        x: the input, (..., *normalized_shape) — with a residual that the path does not add
            itself, the sum.
        normalized_shape: the trailing dims normalized over.
        weight: γ, of ``normalized_shape``, or None.
        bias: β, of ``normalized_shape``, or None.
        eps: added to the variance (or the mean square); None only for a complex input
            (RMSNorm's alone: torch's default, on torch's ops).
        centered: LayerNorm (False: RMSNorm).
        residual: added to ``x`` first by the path, which then returns ``(y, x + residual)``;
            or None.
    """

    x: torch.Tensor
    normalized_shape: tuple[int, ...]
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float | None
    centered: bool
    residual: torch.Tensor | None = None
