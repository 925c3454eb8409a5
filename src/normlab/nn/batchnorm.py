"""BatchNorm1d/2d/3d: one (mean, variance) per channel over the batch and spatial dims."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.fx import Proxy

from ..core import channel_norm
from .base import INPUT_TYPES, ChannelInput, TensorOrProxy, _NormBase, traced_call

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

#: The check a forward may test inline (see _BatchNorm.forward).
_STANDARD_CHECK = ChannelInput._check_input_dim

_DOC = r"""Batch normalization over a {shape_words} input (Ioffe & Szegedy, 2015).

    A drop-in for :class:`torch.nn.{name}` and an instance of it (``isinstance`` checks,
    weight-decay filters and torch's own model tools treat it as one): same constructor
    arguments and defaults, same parameters and buffers (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``) and the same state-dict version, so
    checkpoints move between the two without loss.

    .. math::

        y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}} \cdot \gamma + \beta

    Statistics are per channel, over (N{spatial_dims}). In training the layer normalizes
    with the batch mean and the *biased* batch variance, and updates the running
    estimates with ``running = (1 − momentum)·running + momentum·batch``, storing the
    *unbiased* variance (n / (n − 1), n = elements per channel) as torch.nn does. In
    eval it normalizes with the running estimates. With ``track_running_stats=False``
    it always uses batch statistics.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance before the square root; a finite number >= 0. Default 1e-5.
        momentum: weight of the new batch in the running estimates, in [0, 1], or
            ``None`` for the cumulative average over all batches seen. Default 0.1.
            (Keras/Flax "momentum" 0.99 is a decay: use ``1 - 0.99``.)
        affine: learn γ (init 1) and β (init 0). Default True.
        track_running_stats: keep running estimates for eval. Default True.
        bias: learn β (only with ``affine``). Default True.
        unbiased_running_var: keyword-only. Store the unbiased batch variance in
            ``running_var`` (torch.nn's convention) or, if False, the biased one
            (Keras/Flax's). Default True.
        on_nonfinite: keyword-only. When a training batch has NaN/inf statistics:
            ``"skip"`` leaves the running estimates and ``num_batches_tracked``
            unchanged (warning on CPU); ``"raise"`` raises
            :class:`normlab.core.NonFiniteStatisticsError`. The output is computed from
            the batch either way, so the loss shows the problem. Default ``"skip"``.
        device, dtype: device and floating dtype of the parameters and buffers, as in
            torch.nn. Default None (torch's defaults).

    Shape:
        - Input: {input_shapes}
        - Output: same shape, dtype and memory format as the input.

    Training with one value per channel (N = 1 and no spatial extent) raises
    ``ValueError``, since its batch variance is 0.

    ``forward(input, mask=None)``: ``mask`` is a bool tensor, True where a position is
    valid, shaped like the input without its channel dim ({mask_shapes}) or broadcastable
    to it. Statistics and running estimates then come from the valid (sample, position)
    pairs only; the output and the input gradient are 0 at padded positions, and a batch
    with fewer than 2 valid values leaves the running estimates untouched
    (``docs/sequences.md``).

    Example::

        >>> import normlab as nl
        >>> bn = nl.nn.{name}(16)
        >>> y = bn(torch.randn({example}))
"""


def _doc(name: str, shape_words: str, spatial_dims: str, input_shapes: str, example: str, mask_shapes: str) -> str:
    return _DOC.format(
        name=name,
        shape_words=shape_words,
        spatial_dims=spatial_dims,
        input_shapes=input_shapes,
        example=example,
        mask_shapes=mask_shapes,
    )


class _BatchNorm(_NormBase):
    """Shared forward of BatchNorm1d/2d/3d and BatchNormAct1d/2d/3d (the constructor is
    :class:`._NormBase`'s); subclasses fix the ranks."""

    _operation = "batch_norm"  # its name in normlab.core.record_dispatch

    def forward(self, input: TensorOrProxy, mask: torch.Tensor | None = None) -> TensorOrProxy:
        if isinstance(input, Proxy):
            return traced_call(self, input, mask)
        d = self.__dict__
        # the input check written out for the common case (torch.nn's forward calls it, a frame)
        # where the check is ChannelInput's: not where a subclass overrides it, nor where one is
        # assigned to the class or the instance later (torch.nn's forward calls what is there)
        if not (
            type(self)._check_input_dim is _STANDARD_CHECK
            and "_check_input_dim" not in d
            and type(input) in INPUT_TYPES
            and input.dim() in self._ranks
            and input.shape[1] == self.num_features
        ):
            self._check_input_dim(input)  # says what is wrong, or the check that replaced it
        running = d.get("_running_stats") or self._make_running_stats()
        # torch.nn's rule: the batch's statistics in training (unless frozen) and whenever
        # there are no running estimates; the estimates are passed only when they are used
        # or updated
        tracked = running.buffers["running_mean"] is not None
        batch_stats = (self.training and not self.frozen) or not tracked
        activation = d.get("activation", "identity")  # BatchNormAct's (the plain norm has none)
        return channel_norm(
            input,
            self.weight,
            self.bias,
            eps=self.eps,
            batch_stats=batch_stats,
            running=running if tracked and (not batch_stats or self.track_running_stats) else None,
            activation=activation,
            param=d.get("activation_param", 0.0),
            prelu_weight=cast(nn.PReLU, self.act).weight if activation == "prelu" else None,  # BatchNormAct's
            inplace=d.get("inplace", False),
            mask=mask,
            operation=self._operation,
        )


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    _ranks = (2, 3)
    _shape_words = "2D (N, C) or 3D (N, C, L)"
    __doc__ = _doc("BatchNorm1d", _shape_words, "[, L]", "(N, C) or (N, C, L)", "8, 16, 10", "(N,) or (N, L)")


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    _ranks = (4,)
    _shape_words = "4D (N, C, H, W)"
    __doc__ = _doc(
        "BatchNorm2d", _shape_words, ", H, W", "(N, C, H, W), contiguous or channels_last", "8, 16, 5, 5", "(N, H, W)"
    )


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    _ranks = (5,)
    _shape_words = "5D (N, C, D, H, W)"
    __doc__ = _doc(
        "BatchNorm3d",
        _shape_words,
        ", D, H, W",
        "(N, C, D, H, W), contiguous or channels_last_3d",
        "4, 16, 3, 5, 5",
        "(N, D, H, W)",
    )
