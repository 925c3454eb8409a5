"""BatchRenorm1d/2d/3d: Batch Renormalization (Ioffe, 2017) with r_max/d_max schedules."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import Proxy

from ..core import RunningStats, batch_renorm
from ..core.checks import InputError
from ..core.types import DeviceLike, DTypeLike
from .base import NormOptions, TensorOrProxy, _NormBase, traced_call

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "RenormSchedule"]


@dataclass(frozen=True)
class RenormSchedule:
    """How far r and d may stray, as a function of the training step.

    Ioffe (2017) trains as plain BatchNorm first (r_max = 1, d_max = 0) and then relaxes
    the clips linearly: here both hold for ``warmup_steps`` and then ramp to ``r_max``
    and ``d_max`` over ``ramp_steps``. The step is the layer's ``num_batches_tracked``.
    The paper's ImageNet schedule is about warmup 5k steps, reaching r_max = 3 at 40k
    and d_max = 5 at 25k steps; scale it to your run length.

    Args:
        r_max: the largest r allowed after the ramp; >= 1 (1 is plain BatchNorm). Default 3.0.
        d_max: the largest |d| allowed after the ramp; >= 0 (0 is plain BatchNorm). Default 5.0.
        warmup_steps: steps trained as plain BatchNorm first; >= 0. Default 0.
        ramp_steps: steps over which the clips grow linearly to ``r_max`` and ``d_max``;
            >= 0 (0: at once). Default 0.

    Raises:
        ValueError: a value outside these ranges.
    """

    r_max: float = 3.0
    d_max: float = 5.0
    warmup_steps: int = 0
    ramp_steps: int = 0

    def __post_init__(self) -> None:
        if not self.r_max >= 1:
            raise InputError(f"r_max must be >= 1 (1 is plain BatchNorm), got {self.r_max}")
        if not self.d_max >= 0:
            raise InputError(f"d_max must be >= 0 (0 is plain BatchNorm), got {self.d_max}")
        if self.warmup_steps < 0 or self.ramp_steps < 0:
            raise InputError(f"warmup_steps and ramp_steps must be >= 0, got {self.warmup_steps} and {self.ramp_steps}")

    def at(self, step: int) -> tuple[float, float]:
        """(r_max, d_max) in force at ``step``."""
        if step < self.warmup_steps:
            return 1.0, 0.0
        if self.ramp_steps == 0:
            return float(self.r_max), float(self.d_max)
        progress = min(1.0, (step - self.warmup_steps) / self.ramp_steps)
        return 1.0 + progress * (self.r_max - 1.0), progress * self.d_max

    def limits(self, step: torch.Tensor) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """:meth:`at` for a step held in a tensor, computed on its device (no host sync);
        plain floats when the limits do not depend on the step."""
        if self.warmup_steps == 0 and self.ramp_steps == 0:
            return float(self.r_max), float(self.d_max)
        if self.ramp_steps == 0:
            progress = (step >= self.warmup_steps).to(torch.float64)
        else:
            # a fresh float64 copy of the step, so in place from there: each op counts in a small step;
            # clamp, not clamp_: torch.func.vmap has no rule for clamp_ (the same instructions, callgrind)
            progress = step.to(torch.float64, copy=True).sub_(self.warmup_steps).div_(self.ramp_steps).clamp(0.0, 1.0)
        return (progress * (self.r_max - 1.0)).add_(1.0), progress * self.d_max


_DOC = r"""Batch Renormalization (Ioffe, 2017) over a {shape_words} input.

    Trains like BatchNorm whose batch statistics are corrected toward the running ones,

    .. math::

        y = \gamma \left(\frac{{x - \mu_B}}{{\sigma_B}} r + d\right) + \beta,\quad
        r = \mathrm{{clip}}_{{[1/r_{{max}}, r_{{max}}]}}\frac{{\sigma_B}}{{\sigma}},\quad
        d = \mathrm{{clip}}_{{[-d_{{max}}, d_{{max}}]}}\frac{{\mu_B - \mu}}{{\sigma}}

    with r and d held constant in backward, so that training sees (up to the clips) the
    same normalization as inference: small or non-i.i.d. batches hurt less than with
    BatchNorm. Eval is BatchNorm with the running estimates. Parameters, buffers and
    state-dict keys are BatchNorm's, so BatchNorm checkpoints load directly.

    Args:
        num_features, eps, momentum, affine, bias, unbiased_running_var, on_nonfinite:
            as for :class:`normlab.nn.{bn_name}`. Running statistics are always tracked
            (r and d need them).
        schedule: a :class:`RenormSchedule` (default: r_max = 3, d_max = 5 from the
            first step). ``RenormSchedule(1, 0)`` is exactly BatchNorm.
        device, dtype: device and floating dtype of the parameters and buffers, as in
            torch.nn. Default None (torch's defaults).
"""


class _BatchRenorm(_NormBase):
    # always tracked (r and d need the running statistics): the schedule's step count
    num_batches_tracked: torch.Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
        *,
        schedule: RenormSchedule | None = None,
        bias: bool = True,
        unbiased_running_var: bool = True,
        on_nonfinite: str = "skip",
    ) -> None:
        options: NormOptions = {
            "bias": bias,
            "unbiased_running_var": unbiased_running_var,
            "on_nonfinite": on_nonfinite,
        }
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, **options)
        self.schedule = schedule if schedule is not None else RenormSchedule()

    def _make_running_stats(self) -> RunningStats:
        """The policy of :class:`_NormBase`, marked as one whose tracking cannot stop (vmap's
        error then names what BatchRenorm offers)."""
        stats = super()._make_running_stats()
        stats.tracking_optional = False
        return stats

    def current_limits(self) -> tuple[float, float]:
        """(r_max, d_max) that the next training step will use."""
        return self.schedule.at(int(self.num_batches_tracked))

    def forward(self, input: TensorOrProxy) -> TensorOrProxy:
        if isinstance(input, Proxy):
            return traced_call(self, input)
        self._check_input_dim(input)
        running = self.__dict__.get("_running_stats") or self._make_running_stats()
        batch_stats = (self.training and not self.frozen) or running.buffers["running_mean"] is None
        r_max, d_max = self.schedule.limits(self.num_batches_tracked) if batch_stats else (1.0, 0.0)
        return batch_renorm(
            input,
            self.weight,
            self.bias,
            eps=self.eps,
            batch_stats=batch_stats,
            running=running,
            r_max=r_max,
            d_max=d_max,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", schedule={self.schedule}"


class BatchRenorm1d(_BatchRenorm, nn.BatchNorm1d):
    _ranks = (2, 3)
    _shape_words = "2D (N, C) or 3D (N, C, L)"
    __doc__ = _DOC.format(shape_words=_shape_words, bn_name="BatchNorm1d")


class BatchRenorm2d(_BatchRenorm, nn.BatchNorm2d):
    _ranks = (4,)
    _shape_words = "4D (N, C, H, W)"
    __doc__ = _DOC.format(shape_words=_shape_words, bn_name="BatchNorm2d")


class BatchRenorm3d(_BatchRenorm, nn.BatchNorm3d):
    _ranks = (5,)
    _shape_words = "5D (N, C, D, H, W)"
    __doc__ = _DOC.format(shape_words=_shape_words, bn_name="BatchNorm3d")
