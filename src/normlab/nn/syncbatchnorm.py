"""SyncBatchNorm: BatchNorm with statistics over the batch of every process."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from torch.fx import Proxy
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from ..core import apply_activation
from ..core.checks import InputError
from ..core.types import DeviceLike, DTypeLike
from ..functional.sync import distributed_world, synchronized_batch_norm
from .base import NormOptions, TensorOrProxy
from .batchnorm import _BatchNorm
from .normact import _ActMixin

__all__ = ["SyncBatchNorm", "SyncBatchNormAct"]


class SyncBatchNorm(_BatchNorm, _TorchBatchNorm):
    r"""BatchNorm over the union of every process's batch, on any torch.distributed backend.

    A drop-in for :class:`torch.nn.SyncBatchNorm` — an instance of torch.nn's
    ``_BatchNorm`` base (which weight-decay filters and model tools test for), though
    deliberately not of ``torch.nn.SyncBatchNorm`` itself: DistributedDataParallel refuses
    any module of that class on the CPU, which is the point of this one — same constructor arguments
    (``num_features, eps, momentum, affine, track_running_stats, process_group``),
    parameters, buffers and state-dict keys — that also runs on the CPU with gloo
    (torch.nn's refuses CPU tensors, even with one process), is exact for uneven and
    empty per-process batches (count-weighted Chan merge), and uses one collective in
    forward and one in backward per layer and step (see
    :func:`normlab.functional.sync_batch_norm`).

    Without an initialized process group, with a group of one process, or in eval mode,
    it computes exactly what :class:`normlab.nn.BatchNorm2d` (of the input's rank)
    computes. ``process_group`` restricts the synchronization to a subset of ranks
    (``torch.distributed.new_group``). ``momentum=None``, ``unbiased_running_var`` and
    ``on_nonfinite`` work as for BatchNorm; a batch whose *global* statistics are not
    finite is skipped by every process together.

    Every process of the group must call forward and backward (as DDP requires), even
    with an empty batch. A peer that dies or hangs makes the others fail with a
    ``RuntimeError`` within the process group timeout
    (``init_process_group(timeout=...)``), never a silent hang.

    ``forward(input, mask=None)`` takes a mask of valid positions as
    :class:`normlab.nn.BatchNorm2d` does; the valid positions are counted across processes.

    Args:
        num_features: C, the number of channels.
        eps, momentum, affine, track_running_stats, device, dtype: as for
            :class:`normlab.nn.BatchNorm2d` (``docs/conventions.md#running-statistics``).
        process_group: the ``torch.distributed`` group to synchronize over; None for the
            whole world.
        bias, unbiased_running_var, on_nonfinite: keyword-only, as for
            :class:`normlab.nn.BatchNorm2d`.

    Shape:
        - Input: (N, C, \*) with N ≥ 0 on each process; the total over processes must
          give more than one value per channel, or none (every process empty: an empty
          output and no update, as BatchNorm on N = 0).
        - Output: same shape as the input.
    """

    _ranks = tuple(range(2, 9))
    _shape_words = "(N, C, *) with at least 2 dims"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
        *,
        bias: bool = True,
        unbiased_running_var: bool = True,
        on_nonfinite: str = "skip",
    ) -> None:
        options: NormOptions = {
            "bias": bias,
            "unbiased_running_var": unbiased_running_var,
            "on_nonfinite": on_nonfinite,
        }
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **options)
        self.process_group = process_group

    def forward(self, input: TensorOrProxy, mask: torch.Tensor | None = None) -> TensorOrProxy:
        if not (
            self.training
            and not self.frozen
            and not isinstance(input, Proxy)
            and distributed_world(self.process_group) > 1
        ):
            # eval, frozen, or one process: BatchNorm's call, nothing exchanged
            return super().forward(input, mask)
        self._check_input_dim(input)
        running = self.__dict__.get("_running_stats") or self._make_running_stats()
        tracked = running.buffers["running_mean"] is not None and self.track_running_stats
        out = synchronized_batch_norm(
            input,
            self.weight,
            self.bias,
            eps=self.eps,
            running=running if tracked else None,
            process_group=self.process_group,
            peers_checked=self.__dict__.get("_peers_checked", False),
            mask=mask,
        )
        # Checked once: the layer's channels and dtype are fixed; a peer's input is
        # checked against them at its own first call, which meets this one's.
        self.__dict__["_peers_checked"] = True
        activation = self.__dict__.get("activation", "identity")  # SyncBatchNormAct's
        if activation != "identity":
            # the exchange of gradient sums is not in the fused kernels: the activation follows
            # SyncBatchNormAct's parameter and PReLU module
            prelu_weight = cast(nn.PReLU, self.act).weight if activation == "prelu" else None
            out = apply_activation(out, activation, cast(float, self.activation_param), prelu_weight)
        return out


class SyncBatchNormAct(_ActMixin, SyncBatchNorm):
    """SyncBatchNorm followed by an activation (the norm+act form of SyncBatchNorm).

    Same extra arguments as :class:`normlab.nn.BatchNormAct2d`, with ``inplace`` only False; what
    :func:`normlab.surgery.convert_sync_batchnorm` turns a BatchNormAct into. Where the
    statistics are this process's or given — eval mode, a frozen layer, a group of one
    process or none — it is :class:`normlab.nn.BatchNormAct2d`'s fused pass. Synchronized
    training normalizes with every process's statistics, whose backward is an exchange of
    gradient sums that the fused kernels do not compute: there the activation follows the
    normalization as a separate op.

    Args:
        num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype:
            as for :class:`SyncBatchNorm`.
        activation: keyword-only. "relu" (default), "leaky_relu", "elu", "silu", "prelu" or
            "identity".
        activation_param: keyword-only. LeakyReLU's slope (default 0.01), ELU's alpha (1.0),
            PReLU's initial slope (0.25).
        inplace: keyword-only. Only False (the default): there is no in-place mode here.
        **kwargs: the plain norm's keyword-only ``bias``, ``unbiased_running_var`` and
            ``on_nonfinite``.

    Raises:
        ValueError: an unknown activation, or ``inplace=True``.
        TypeError: an unknown keyword argument.
    """

    _operation = "batch_norm_act"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
        *,
        activation: str = "relu",
        activation_param: float | None = None,
        inplace: bool = False,
        **kwargs: Any,
    ) -> None:
        self._check_norm_keywords(kwargs)
        if inplace:
            raise InputError(
                f"{type(self).__name__} has no in-place mode (inplace=True): that mode is the fused "
                "kernels', and synchronized training's backward (an exchange of gradient sums across "
                "processes) is not in them. Use inplace=False (the default), or BatchNormAct2d(inplace=True) "
                "where the batch statistics are not synchronized"
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype, **kwargs
        )
        self._init_activation(num_features, activation, activation_param, False, device, dtype)
