"""EvoNorm layers (Liu, Brock, Simonyan & Le, 2020): B0, B1, B2 (batch) and S0, S1, S2 (sample),
with timm's "a" variants — drop-ins for timm's ``EvoNorm2d*`` classes (same constructors,
parameters, buffers and state-dict keys). The formulas: :mod:`normlab.functional.evonorm`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.fx import Proxy

from ..core import check_momentum, check_nonfinite_policy, check_positive_int
from ..core.checks import InputError
from ..core.types import ActLayer, DeviceLike, DTypeLike
from ..functional.evonorm import evonorm_batch, evonorm_sample
from .base import FreezableNorm, TensorOrProxy, check_channel_input, init_channel_params, traced_call
from .filter_response import make_act

__all__ = [
    "EvoNormB0",
    "EvoNormB1",
    "EvoNormB2",
    "EvoNormS0",
    "EvoNormS0a",
    "EvoNormS1",
    "EvoNormS1a",
    "EvoNormS2",
    "EvoNormS2a",
]


class _EvoNorm(FreezableNorm, nn.Module):
    """γ = 1, β = 0 (and v = 1 where the layer has v), shape (C,); the 4D input check."""

    num_features: int
    eps: float
    weight: nn.Parameter
    bias: nn.Parameter
    v: nn.Parameter | None

    def reset_parameters(self) -> None:
        """γ = 1, β = 0, v = 1."""
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        if self.v is not None:
            nn.init.ones_(self.v)

    def _check(self, input: object) -> None:
        check_channel_input(self, input, (4,), "(N, C, H, W)")


class _EvoNormBatch(_EvoNorm):
    """The batch family: a running variance, updated in training unless frozen."""

    _variant = "b0"
    _has_v = False
    running_var: torch.Tensor

    def __init__(
        self,
        num_features: int,
        apply_act: bool = True,
        momentum: float = 0.1,
        eps: float = 1e-5,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
        *,
        unbiased_running_var: bool = True,
        on_nonfinite: str = "skip",
        **_: object,
    ) -> None:
        init_channel_params(self, num_features, eps, "v", self._has_v and apply_act, device, dtype)
        self.apply_act = bool(apply_act)
        if momentum is None:
            raise InputError(
                "momentum=None (a cumulative average) needs a count of the batches seen, which EvoNorm's "
                "state (timm's: weight, bias, v, running_var) does not keep; pass a float in [0, 1]"
            )
        self.momentum = check_momentum(momentum, allow_none=False)
        self.unbiased_running_var = bool(unbiased_running_var)
        self.on_nonfinite = check_nonfinite_policy(on_nonfinite)
        self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """running_var = 1 (timm's initial value)."""
        self.running_var.fill_(1)

    def forward(self, input: TensorOrProxy) -> TensorOrProxy:
        if isinstance(input, Proxy):
            return traced_call(self, input)
        self._check(input)
        return evonorm_batch(
            input,
            self.running_var,
            self.weight,
            self.bias,
            self.v,
            self.training and not self.frozen,
            self.momentum,
            self.eps,
            variant=self._variant,
            apply_act=self.apply_act,
            unbiased_running_var=self.unbiased_running_var,
            on_nonfinite=self.on_nonfinite,
        )

    def extra_repr(self) -> str:
        text = f"{self.num_features}, apply_act={self.apply_act}, momentum={self.momentum}, eps={self.eps}"
        return text + (", frozen=True" if self.frozen else "")


_KWARGS_IGNORED = """        **kwargs: further keywords of timm's constructor, accepted and ignored.
"""
_DEVICE = """        device, dtype: device and floating dtype of the parameters, as in torch.nn.
            Default None (torch's defaults).
"""
_ACT_LAYER = """
        act_layer: the activation: a module class, an instance (copied) or None for SiLU.
            Default None."""
_KWARGS_TO_PARENT = """        **kwargs: ``device`` and ``dtype`` as for the parent class; further keywords of
            timm's constructor are accepted and ignored.
"""

_BATCH_DOC = r"""

    σ_B is the standard deviation of each channel over (N, H, W) in training — biased where
    it normalizes, stored unbiased (n/(n − 1)) in ``running_var`` with torch.nn's momentum
    convention — and √(running_var + ε) in eval or when frozen. A batch whose variance is not
    finite leaves ``running_var`` untouched (``on_nonfinite="skip"``, with a warning) or
    raises (``"raise"``). ``momentum=None`` is refused: timm's state keeps no batch count.
    ``apply_act=False`` gives the affine map alone, as timm's.

    Args:
        num_features: C.
        apply_act: the nonlinearity (and the normalization with it). Default True.
        momentum: weight of the new batch in the running variance. Default 0.1.
        eps: added to each variance; default {eps}.
        unbiased_running_var, on_nonfinite: keyword-only, as normlab's BatchNorm.
        device, dtype: device and floating dtype of the parameters and buffers, as in
            torch.nn. Default None (torch's defaults).
{rest}"""


class EvoNormB0(_EvoNormBatch):
    __doc__ = r"""EvoNorm-B0: :math:`y = \frac{x}{\max(\sigma_B,\ v x + \sigma_I)} \gamma + \beta`.

    σ_I is the standard deviation of each (sample, channel) over (H, W); v, γ, β are learned
    per channel (v init 1).""" + _BATCH_DOC.format(eps="1e-3", rest=_KWARGS_IGNORED)

    _variant = "b0"
    _has_v = True

    def __init__(
        self,
        num_features: int,
        apply_act: bool = True,
        momentum: float = 0.1,
        eps: float = 1e-3,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
        *,
        unbiased_running_var: bool = True,
        on_nonfinite: str = "skip",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_features,
            apply_act,
            momentum,
            eps,
            device,
            dtype,
            unbiased_running_var=unbiased_running_var,
            on_nonfinite=on_nonfinite,
            **kwargs,
        )


class EvoNormB1(_EvoNormBatch):
    __doc__ = r"""EvoNorm-B1: :math:`y = \frac{x}{\max(\sigma_B,\ (x + 1) \rho_I)} \gamma + \beta`,
    ρ_I = √(mean_{H,W}(x²) + ε) per (sample, channel).""" + _BATCH_DOC.format(eps="1e-5", rest="")

    _variant = "b1"


class EvoNormB2(_EvoNormBatch):
    __doc__ = r"""EvoNorm-B2: :math:`y = \frac{x}{\max(\sigma_B,\ \rho_I - x)} \gamma + \beta`,
    ρ_I = √(mean_{H,W}(x²) + ε) per (sample, channel).""" + _BATCH_DOC.format(eps="1e-5", rest="")

    _variant = "b2"


class _EvoNormSample(_EvoNorm):
    """The sample family: statistics of each (sample, group of channels); nothing running."""

    _stat = "std"
    _always = False  # timm's "a" variants divide by the statistic even without the activation
    _gate = False  # S0: x·sigmoid(v·x); S1/S2: act(x)
    act: nn.Module  # S1/S2's

    def __init__(
        self,
        num_features: int,
        groups: int = 32,
        group_size: int | None = None,
        apply_act: bool = True,
        act_layer: ActLayer = None,
        eps: float = 1e-5,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
        **_: object,
    ) -> None:
        init_channel_params(self, num_features, eps, "v", self._gate and apply_act, device, dtype)
        self.apply_act = bool(apply_act)
        self.groups = _groups(num_features, groups, group_size)
        if not self._gate:
            self.act = make_act((act_layer or nn.SiLU) if apply_act else None)
        self.reset_parameters()

    def forward(self, input: TensorOrProxy) -> TensorOrProxy:
        if isinstance(input, Proxy):
            return traced_call(self, input)
        self._check(input)
        numerator: str | Callable[[torch.Tensor], torch.Tensor] | None
        if self._gate:
            numerator = "gate" if self.v is not None else None
        else:
            numerator = self.act if (self.apply_act or self._always) else None
        acts = self.apply_act or self._always
        return evonorm_sample(
            input,
            self.groups,
            self.weight,
            self.bias,
            self.eps,
            numerator=numerator,
            stat=self._stat if acts else None,
            v=self.v,
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, apply_act={self.apply_act}, eps={self.eps}"


def _groups(num_features: int, groups: int, group_size: int | None) -> int:
    """timm's rule: ``group_size`` channels per group when given, else ``groups`` groups."""
    channels = check_positive_int(num_features, "num_features")
    if group_size:
        size = check_positive_int(group_size, "group_size")
        if channels % size:
            raise InputError(f"group_size={size} must divide num_features={channels}")
        return channels // size
    groups = check_positive_int(groups, "groups")
    if channels % groups:
        raise InputError(
            f"groups={groups} must divide num_features={channels}; pass group_size or a divisor of {channels}"
        )
    return groups


_SAMPLE_ARGS = r"""

    σ_G (ρ_G) is the standard deviation (root mean square) of each (sample, group) over the
    group's C/G channels and (H, W), ε added to the variance. Nothing depends on the batch.

    Args:
        num_features: C.
        groups: G (default 32), or ``group_size`` channels per group when that is given.
        group_size: channels per group, as timm's; overrides ``groups`` when given (it must
            divide ``num_features``). Default None.
        apply_act: the nonlinearity.{apply_act}{act_layer}
        eps: default {eps}.
{rest}"""


class EvoNormS0(_EvoNormSample):
    __doc__ = (
        r"""EvoNorm-S0: :math:`y = \frac{x \cdot \mathrm{sigmoid}(v x)}{\sigma_G} \gamma + \beta`, v init 1."""
        + _SAMPLE_ARGS.format(
            apply_act=" Without it the layer is the affine map alone, as timm's.",
            act_layer="",
            eps="1e-5",
            rest=_DEVICE,
        )
    )

    _gate = True

    def __init__(
        self,
        num_features: int,
        groups: int = 32,
        group_size: int | None = None,
        apply_act: bool = True,
        eps: float = 1e-5,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
        **_: Any,
    ) -> None:
        super().__init__(num_features, groups, group_size, apply_act, None, eps, device, dtype)


class EvoNormS0a(EvoNormS0):
    __doc__ = r"""EvoNorm-S0 as timm's ``EvoNorm2dS0a`` (RegNetZ "evos" models): eps 1e-3, and the division
    by σ_G stays when ``apply_act=False`` (then :math:`y = x / \sigma_G \cdot \gamma + \beta`).""" + _SAMPLE_ARGS.format(
        apply_act="", act_layer="", eps="1e-3", rest=_DEVICE
    )

    _always = True

    def __init__(
        self,
        num_features: int,
        groups: int = 32,
        group_size: int | None = None,
        apply_act: bool = True,
        eps: float = 1e-3,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
        **_: Any,
    ) -> None:
        super().__init__(num_features, groups, group_size, apply_act, eps, device, dtype)


class EvoNormS1(_EvoNormSample):
    __doc__ = r"""EvoNorm-S1: :math:`y = \frac{\mathrm{act}(x)}{\sigma_G} \gamma + \beta`, ``act`` SiLU by default
    (``act_layer``).""" + _SAMPLE_ARGS.format(
        apply_act=" Without it the layer is the affine map alone.", act_layer=_ACT_LAYER, eps="1e-5", rest=_DEVICE
    )


class EvoNormS1a(EvoNormS1):
    __doc__ = r"""EvoNorm-S1 as timm's ``EvoNorm2dS1a``: eps 1e-3, and the division by σ_G stays when
    ``apply_act=False``.""" + _SAMPLE_ARGS.format(
        apply_act="", act_layer=_ACT_LAYER, eps="1e-3", rest=_KWARGS_TO_PARENT
    )

    _always = True

    def __init__(
        self,
        num_features: int,
        groups: int = 32,
        group_size: int | None = None,
        apply_act: bool = True,
        act_layer: ActLayer = None,
        eps: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, groups, group_size, apply_act, act_layer, eps, **kwargs)


class EvoNormS2(_EvoNormSample):
    __doc__ = (
        r"""EvoNorm-S2: :math:`y = \frac{\mathrm{act}(x)}{\rho_G} \gamma + \beta`, ``act`` SiLU by default."""
        + _SAMPLE_ARGS.format(
            apply_act=" Without it the layer is the affine map alone.", act_layer=_ACT_LAYER, eps="1e-5", rest=_DEVICE
        )
    )

    _stat = "rms"


class EvoNormS2a(EvoNormS2):
    __doc__ = r"""EvoNorm-S2 as timm's ``EvoNorm2dS2a``: eps 1e-3, and the division by ρ_G stays when
    ``apply_act=False``.""" + _SAMPLE_ARGS.format(
        apply_act="", act_layer=_ACT_LAYER, eps="1e-3", rest=_KWARGS_TO_PARENT
    )

    _always = True

    def __init__(
        self,
        num_features: int,
        groups: int = 32,
        group_size: int | None = None,
        apply_act: bool = True,
        act_layer: ActLayer = None,
        eps: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, groups, group_size, apply_act, act_layer, eps, **kwargs)


#: every EvoNorm class, batch variants then sample ones (``normlab.nn.BEYOND_NORM_LAYERS`` holds them)
EVONORM_LAYERS: tuple[type[nn.Module], ...] = (
    EvoNormB0,
    EvoNormB1,
    EvoNormB2,
    EvoNormS0,
    EvoNormS0a,
    EvoNormS1,
    EvoNormS1a,
    EvoNormS2,
    EvoNormS2a,
)
