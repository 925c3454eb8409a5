"""Running (population) statistics: the moving-average update and its conventions.

PyTorch convention, used throughout normlab::

    running = (1 − momentum) · running + momentum · batch_statistic

``momentum=None`` in a module means the cumulative average: momentum = 1 / k for the
k-th batch, so the running value is the plain mean over all batches seen.

The variance stored is *unbiased* by default — batch variance · n / (n − 1) with n the
elements per statistic — as torch.nn stores it, while normalization during training uses
the *biased* batch variance. ``unbiased=False`` stores the biased one instead (the
Keras/Flax choice).

Keras and Flax call the weight of the *old* value "momentum" (default 0.99); that is a
decay d, and PyTorch's momentum is 1 − d. Use :func:`momentum_from_decay` and
:func:`from_decay_convention` rather than passing 0.99 where 0.01 is meant.

A batch whose statistics are not finite (NaN/inf from an overflow, a bad sample, a
diverging step) leaves the running estimates untouched; see :func:`update_running_stats`.

:class:`RunningStats` is a layer's whole policy — its buffers, the batch counter, momentum,
the variance convention and the non-finite policy — in one object, built once by the module
(and by a functional from its arguments) and passed down to the norm families' entries as
one value. The update is implemented once per backend: inside the kernels' call (C++,
``kernels/cpu/running.cpp``) and here, in torch ops, for every other path and for what the
kernels hand back (a batch that is not finite warns or raises here).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, cast

import torch

from .checks import InputError, check_momentum

__all__ = [
    "DecayStatistics",
    "RunningStats",
    "NONFINITE_POLICIES",
    "NonFiniteStatisticsError",
    "RunningStatistics",
    "check_nonfinite_policy",
    "decay_from_momentum",
    "from_decay_convention",
    "momentum_from_decay",
    "to_decay_convention",
    "update_running_stats",
    "update_running_stats_if",
]

NonFinitePolicy = Literal["skip", "raise"]
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor

#: What ``on_nonfinite=`` accepts: ``"skip"`` a batch with NaN/inf statistics, or ``"raise"``
#: :class:`NonFiniteStatisticsError` (``docs/conventions.md#non-finite-batches``).
NONFINITE_POLICIES: tuple[NonFinitePolicy, ...] = ("skip", "raise")


class NonFiniteStatisticsError(FloatingPointError):
    """A batch's statistics were NaN or infinite and the policy is ``"raise"``."""


def check_nonfinite_policy(policy: object) -> NonFinitePolicy:
    """``policy`` if it is one of :data:`NONFINITE_POLICIES`.

    Raises:
        InputError: for anything else (a ValueError).

    Args:
        policy: the value to check: "skip" or "raise".

    Returns:
        ``policy``.
    """
    if policy not in NONFINITE_POLICIES:
        raise InputError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}")
    return policy


def update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    count: int | torch.Tensor,
    momentum: float | None,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    unbiased: bool = True,
    on_nonfinite: NonFinitePolicy = "skip",
) -> torch.Tensor:
    """Fold one batch's per-channel statistics into the running estimates, in place.

    Args:
        running_mean, running_var: buffers of shape (C,), updated in place.
        batch_mean, batch_var: this batch's mean and *biased* variance, shape (C,).
        count: elements each statistic was computed over (n in n / (n − 1)); an int, or a
            0-dim tensor when it is only known on the device (SyncBatchNorm).
        momentum: weight of the new batch in [0, 1]; ``None`` is the cumulative average,
            momentum 1 / (k + 1) with k = ``num_batches_tracked`` (required then).
        num_batches_tracked: a long 0-dim counter, incremented when the batch is merged in.
        unbiased: store batch_var · n / (n − 1) (torch.nn's choice) or batch_var.
        on_nonfinite: ``"skip"`` leaves the buffers (and the counter) untouched when a batch
            statistic — or the updated estimate itself, e.g. a float16 ``running_var``
            that would overflow — is NaN/inf (with a ``RuntimeWarning`` in eager mode on
            the CPU, where checking is free; elsewhere the skip is a ``torch.where``,
            without a host sync); ``"raise"`` raises :class:`NonFiniteStatisticsError`
            before anything is written (a host sync: eager only).

    Returns:
        A 0-dim bool tensor, True when the batch was merged in.
    """
    for name, buffer in (("running_mean", running_mean), ("running_var", running_var)):
        if buffer.numel() > 1 and 0 in buffer.stride():
            raise InputError(
                f"{name} is an expanded view (strides {buffer.stride()}): its {buffer.numel()} entries "
                f"share memory, so they cannot be updated one by one; pass a real tensor, e.g. "
                f"{name}.clone()"
            )
    # a vmapped update cannot read its values: it keeps the torch.where form. The buffers are
    # batched without the batch when an ensemble of models (torch.func.stack_module_state) sees
    # one shared input
    eager_cpu = (
        running_mean.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not _functorch_wrapped(batch_mean)
        and not _functorch_wrapped(running_mean)
    )
    with torch.no_grad():
        rate: float | torch.Tensor  # the batch's weight: momentum, or 1 / (k + 1) for None
        if momentum is None:
            if num_batches_tracked is None:
                check_momentum(None, allow_none=False)  # raises, saying what to pass
            # A tensor, not float(num_batches_tracked): no host sync on accelerators.
            rate = 1.0 / (num_batches_tracked.to(torch.float64) + 1.0)
        else:
            rate = momentum
        if unbiased:
            if isinstance(count, torch.Tensor):
                correction = torch.where(count > 1, count / (count - 1).clamp(min=1), 1.0)
                var = batch_var * correction.to(batch_var.dtype)
            else:
                var = batch_var * (count / (count - 1)) if count > 1 else batch_var
        else:
            var = batch_var
        mean = batch_mean.to(running_mean.dtype)
        var = var.to(running_var.dtype)
        new_mean = running_mean * (1 - rate) + mean * rate
        new_var = running_var * (1 - rate) + var * rate
        finite = torch.isfinite(torch.cat([new_mean, new_var, mean.to(new_mean.dtype), var.to(new_mean.dtype)])).all()
        if on_nonfinite == "raise" or eager_cpu:
            if not bool(finite):  # a host sync: free on the CPU, asked for under "raise"
                _nonfinite(on_nonfinite)
                return finite
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
        else:
            # Keep the old values where the batch was not finite, without a host sync.
            running_mean.copy_(torch.where(finite, new_mean, running_mean))
            running_var.copy_(torch.where(finite, new_var, running_var))
        if num_batches_tracked is not None:
            num_batches_tracked.add_(finite.to(num_batches_tracked.dtype))
    return finite


def _nonfinite(on_nonfinite: str) -> None:
    if on_nonfinite == "raise":
        raise NonFiniteStatisticsError(
            "batch statistics are not finite (NaN or inf in the input or its variance, or "
            "a running estimate that would overflow); the running estimates are unchanged. "
            "Pass on_nonfinite='skip' to skip such batches with a warning instead"
        )
    warnings.warn(
        "batch statistics are not finite (NaN or inf in the input or its variance, or a "
        "running estimate that would overflow); skipped this batch, the running estimates "
        "are unchanged",
        RuntimeWarning,
        stacklevel=5,
    )


_VMAP_TEXT = (
    "vmap over a normalization layer that tracks running statistics: the input is batched by vmap "
    "but running_mean and running_var, which the layer updates in place, are not. "
)
#: the error for a vmapped input and unbatched estimates, by ``RunningStats.tracking_optional``
_VMAP_ADVICE = {
    True: _VMAP_TEXT + "Patch the model with torch.func.replace_all_batch_norm_modules_(model) (it stops the "
    "tracking), build the layer with track_running_stats=False, or call model.eval() to normalize with "
    "the running estimates",
    False: _VMAP_TEXT + "BatchRenorm measures every training batch against them, so it cannot stop tracking "
    "(it has no track_running_stats, and torch.func.replace_all_batch_norm_modules_ would remove the "
    "estimates it needs). Call model.eval() or freeze the layer (layer.freeze(), "
    "normlab.surgery.freeze_norms(model)) to normalize with the running estimates, or give each vmapped "
    "call its own estimates (torch.func.stack_module_state and functional_call, the buffers vmapped with "
    "the input)",
}


class RunningStats:
    """The running-statistics policy of one layer (or one functional call): where the running
    estimates live and how a batch updates them.

    ``buffers`` is a mapping that holds ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` (absent or None where the layer has none). A module passes its own
    ``_buffers``, read at every call, so the tensors updated are always the module's current
    ones — after ``.to()``, ``load_state_dict(assign=True)``, inside
    ``torch.func.functional_call`` or ``torch.export``. ``momentum`` (None: the cumulative
    average over ``num_batches_tracked``), ``unbiased`` (store n/(n − 1)·var) and
    ``on_nonfinite`` ("skip" or "raise") are the conventions of :func:`update_running_stats`.

    Build it with :meth:`of` (checks the arguments) or, in a module, once per change of its
    settings. The fields are plain attributes: the kernels' entry reads them from C++.

    Args:
        buffers: the mapping that holds the estimates (a module's ``_buffers``).
        momentum: the PyTorch-convention momentum, or None (cumulative average).
        unbiased: store the unbiased batch variance.
        on_nonfinite: "skip" or "raise".
    """

    def __init__(
        self,
        buffers: dict[str, torch.Tensor | None],
        momentum: float | None,
        unbiased: bool,
        on_nonfinite: NonFinitePolicy,
    ) -> None:
        self.buffers = buffers
        self.momentum = momentum
        self.unbiased = bool(unbiased)
        self.on_nonfinite = on_nonfinite
        self.skips_nonfinite = on_nonfinite == "skip"
        #: the layer can stop tracking (track_running_stats=False); BatchRenorm's policy sets
        #: False: it measures every training batch against the estimates
        self.tracking_optional = True

    @classmethod
    def of(
        cls,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        num_batches_tracked: torch.Tensor | None = None,
        *,
        momentum: float | None = 0.1,
        unbiased: bool = True,
        on_nonfinite: str = "skip",
    ) -> RunningStats:
        """The policy over these tensors, its arguments checked: ``momentum`` in [0, 1], or
        None with ``num_batches_tracked``; ``on_nonfinite`` one of :data:`NONFINITE_POLICIES`."""
        momentum = check_momentum(momentum, allow_none=num_batches_tracked is not None)
        policy = check_nonfinite_policy(on_nonfinite)  # on_nonfinite itself, checked
        buffers = {"running_mean": running_mean, "running_var": running_var, "num_batches_tracked": num_batches_tracked}
        return cls(buffers, momentum, unbiased, policy)

    @property
    def running_mean(self) -> torch.Tensor | None:
        return self.buffers.get("running_mean")

    @property
    def running_var(self) -> torch.Tensor | None:
        return self.buffers.get("running_var")

    @property
    def num_batches_tracked(self) -> torch.Tensor | None:
        return self.buffers.get("num_batches_tracked")

    def update(
        self,
        mean: torch.Tensor,
        var: torch.Tensor,
        count: int | torch.Tensor,
        *,
        enough: torch.Tensor | None = None,
        unbiased: bool | None = None,
    ) -> torch.Tensor | None:
        """Merge one batch's statistics into the estimates (torch ops; see
        :func:`update_running_stats`): ``mean`` and the *biased* ``var`` per channel (C,), or
        per instance (N, C), whose batch average is merged — every instance then has the
        same ``count``, so unbiasing after averaging is exact. ``enough``: a 0-dim bool tensor,
        merge only where True (a masked batch with fewer than 2 valid values is not merged).
        ``unbiased``: override the policy's (False for a variance already unbiased)."""
        if not torch.compiler.is_compiling() and _functorch_wrapped(mean):
            mean, var = self._transform_constants(mean), self._transform_constants(var)
            if not _functorch_wrapped(mean):
                # plain values now: merged outside the transform, which would refuse to
                # write a tensor it captured
                with torch._C._DisableFuncTorch():
                    return self.update(mean, var, count, enough=enough, unbiased=unbiased)
        if mean.dim() == 2:
            mean, var = mean.mean(0), var.mean(0)
        # the entries update a policy only where it holds both estimates
        running_mean, running_var = cast(torch.Tensor, self.running_mean), cast(torch.Tensor, self.running_var)
        arguments = (running_mean, running_var, mean, var, count, self.momentum)
        counter = self.num_batches_tracked
        unbiased = self.unbiased if unbiased is None else unbiased
        if enough is not None:
            update_running_stats_if(
                enough, *arguments, num_batches_tracked=counter, unbiased=unbiased, on_nonfinite=self.on_nonfinite
            )
            return None
        return update_running_stats(
            *arguments, num_batches_tracked=counter, unbiased=unbiased, on_nonfinite=self.on_nonfinite
        )

    def _transform_constants(self, stat: torch.Tensor) -> torch.Tensor:
        """A batch statistic computed under a ``torch.func`` transform, as the plain tensor the
        buffers can take. grad/jvp/vjp wrap it to track derivatives, which the running
        estimates never carry (torch.nn's InstanceNorm updates them there too): unwrapped, the
        value is the same. Under vmap it holds one statistic per vmapped sample, which one
        unbatched buffer cannot hold: torch.nn's BatchNorm refuses that too, and so does this,
        naming the fix."""
        while _functorch_wrapped(stat):
            running_mean = cast(torch.Tensor, self.running_mean)  # update() is asked only with estimates
            if torch._C._functorch.is_batchedtensor(stat) and not _functorch_wrapped(running_mean):
                raise RuntimeError(_VMAP_ADVICE[self.tracking_optional])
            if torch._C._functorch.is_batchedtensor(stat):
                return stat  # batched buffers too (e.g. torch.func.stack_module_state): vmap updates them
            stat = torch._C._functorch.get_unwrapped(stat)
        return stat

    def __repr__(self) -> str:
        present = [name for name, t in self.buffers.items() if t is not None]
        return (
            f"RunningStats(buffers={present}, momentum={self.momentum}, unbiased={self.unbiased}, "
            f"on_nonfinite={self.on_nonfinite!r})"
        )


def update_running_stats_if(
    enough: torch.Tensor, *args: Any, num_batches_tracked: torch.Tensor | None = None, **kwargs: Any
) -> None:
    """:func:`normlab.core.update_running_stats` (``*args`` as its: the buffers, the batch's
    statistics, the count, momentum), applied only where the 0-dim bool ``enough`` is True (a
    batch with at least 2 valid values) — without a host sync off the CPU: the update is
    computed, then ``torch.where`` keeps the old buffers when not.

    Args:
        enough: a 0-dim bool tensor: merge this batch or not.
        *args: :func:`update_running_stats`'s positional arguments.
        num_batches_tracked: keyword-only; the batch counter, or None. Default None.
        **kwargs: :func:`update_running_stats`'s other keywords (``unbiased``, ``on_nonfinite``).
    """
    running_mean, running_var = args[:2]
    if running_mean.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(enough):  # free on the CPU
            update_running_stats(*args, num_batches_tracked=num_batches_tracked, **kwargs)
        return
    with torch.no_grad():
        old = [t.clone() for t in (running_mean, running_var, num_batches_tracked) if t is not None]
        update_running_stats(*args, num_batches_tracked=num_batches_tracked, **kwargs)
        for t, before in zip((running_mean, running_var, num_batches_tracked), old):
            t.copy_(torch.where(enough, t, before))


def momentum_from_decay(decay: float) -> float:
    """Keras/Flax ``momentum`` (a decay d, weight of the old value) → PyTorch momentum 1 − d.

    Args:
        decay: d, in [0, 1].

    Returns:
        1 − d.

    Raises:
        ValueError: a value outside [0, 1] or not a number.
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay <= 1:
        raise InputError(f"decay must be a float in [0, 1], got {decay!r}")
    return 1.0 - float(decay)


def decay_from_momentum(momentum: float) -> float:
    """PyTorch momentum → Keras/Flax decay 1 − momentum.

    Args:
        momentum: the PyTorch-convention momentum, in [0, 1].

    Returns:
        1 − momentum.

    Raises:
        ValueError, TypeError: as :func:`check_momentum`.
    """
    return 1.0 - check_momentum(momentum, allow_none=False)


class RunningStatistics(NamedTuple):
    """Running estimates in torch.nn's convention, from :func:`from_decay_convention`.

    Attributes:
        running_mean: torch.nn's running mean.
        running_var: torch.nn's running variance (unbiased, or as given).
        momentum: the PyTorch-convention momentum, 1 − decay.
    """

    running_mean: torch.Tensor
    running_var: torch.Tensor
    momentum: float


class DecayStatistics(NamedTuple):
    """Moving statistics in Keras/Flax's convention, from :func:`to_decay_convention`.

    Attributes:
        moving_mean: Keras' ``moving_mean`` (Flax's ``mean``).
        moving_variance: Keras' ``moving_variance`` (Flax's ``var``), biased.
        decay: the Keras/Flax "momentum", 1 − momentum.
    """

    moving_mean: torch.Tensor
    moving_variance: torch.Tensor
    decay: float


def from_decay_convention(
    moving_mean: torch.Tensor,
    moving_variance: torch.Tensor,
    decay: float,
    *,
    elements_per_batch: int | None = None,
) -> RunningStatistics:
    """Convert Keras/Flax BatchNorm statistics to normlab/torch.nn's convention.

    Keras ``BatchNormalization`` and Flax ``BatchNorm`` keep a moving average of the
    *biased* batch variance with ``new = decay·old + (1 − decay)·batch``. torch.nn keeps
    the *unbiased* one with ``momentum = 1 − decay``. Given ``elements_per_batch`` (the n
    of each batch statistic: batch size × spatial size) the variance is rescaled by
    n / (n − 1) so that a torch.nn-style layer continues the same average; without it the
    variance is passed through unchanged (a relative difference of 1/(n − 1)), which is
    what a layer built with ``unbiased_running_var=False`` expects.

    Args:
        moving_mean: the moving mean, shape (C,).
        moving_variance: the moving (biased) variance, shape (C,).
        decay: the Keras/Flax "momentum" d, in [0, 1].
        elements_per_batch: keyword-only; n, the values per channel in a training batch;
            None to pass the variance through. Default None.

    Returns:
        The :class:`RunningStatistics` (new tensors).

    Raises:
        ValueError: a ``decay`` outside [0, 1], or ``elements_per_batch`` < 2.
    """
    momentum = momentum_from_decay(decay)
    var = _rescaled_variance(moving_variance, elements_per_batch, unbias=True)
    return RunningStatistics(moving_mean.clone(), var.clone(), momentum)


def to_decay_convention(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    momentum: float,
    *,
    elements_per_batch: int | None = None,
) -> DecayStatistics:
    """Inverse of :func:`from_decay_convention`.

    Args:
        running_mean: torch.nn's running mean, shape (C,).
        running_var: torch.nn's running (unbiased) variance, shape (C,).
        momentum: the PyTorch-convention momentum, in [0, 1].
        elements_per_batch: keyword-only; n, to rescale the variance to biased by (n − 1)/n;
            None to pass it through. Default None.

    Returns:
        The :class:`DecayStatistics` (new tensors).

    Raises:
        ValueError: a ``momentum`` outside [0, 1], or ``elements_per_batch`` < 2.
    """
    decay = decay_from_momentum(momentum)
    var = _rescaled_variance(running_var, elements_per_batch, unbias=False)
    return DecayStatistics(running_mean.clone(), var.clone(), decay)


def _rescaled_variance(var: torch.Tensor, elements_per_batch: int | None, *, unbias: bool) -> torch.Tensor:
    """The conversions' variance: times n/(n − 1) (``unbias``, biased → unbiased) or
    (n − 1)/n, for n = ``elements_per_batch``; passed through without it."""
    if elements_per_batch is None:
        return var
    if elements_per_batch < 2:
        raise InputError(f"elements_per_batch must be >= 2 to rescale a variance, got {elements_per_batch}")
    n = elements_per_batch
    return var * (n / (n - 1) if unbias else (n - 1) / n)


if TYPE_CHECKING:
    _Policy = RunningStats  # to the checker it is a RunningStats: it answers every attribute as one
else:
    _Policy = object  # at run time it forwards them (__getattr__), holding no state of its own


class DiscardingStats(_Policy):
    """A checkpoint recompute's view of a :class:`RunningStats`: it reads the policy's
    estimates and options and merges nothing, so torch's ops run as they did in the forward
    (checkpointing requires the same saved tensors) without a second update."""

    def __init__(self, running: RunningStats) -> None:
        self._running = running

    def __getattr__(self, name: str) -> Any:
        return getattr(self._running, name)

    def update(self, *args: object, **kwargs: object) -> None:
        return None
