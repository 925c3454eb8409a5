"""Fused normalization + activation: BatchNormAct1d/2d/3d and GroupNormAct.

They subclass the plain norms, so a checkpoint of ``BatchNorm2d`` loads into
``BatchNormAct2d`` and back (state-dict keys are the norm's, plus the activation's own —
``act.weight`` for PReLU). ``act`` is the activation module, kept for ``repr``, state and
for surgery (folding a BatchNormAct leaves ``act`` behind); the forward never calls it:
normalization and activation run as one fused pass — the plain norm's forward, which passes
the layer's ``activation``, ``activation_param`` and ``inplace`` to the same family entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..core import ACTIVATIONS, check_activation
from ..core.activation import FUSED_ACTIVATIONS
from ..core.checks import InputError, InputTypeError
from ..core.types import DeviceLike, DTypeLike
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .groupnorm import GroupNorm

__all__ = [
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "GroupNormAct",
    "activation_spec",
    "timm_norm_act",
]


# torch.nn activation classes with a fused form (exact classes: a subclass may compute
# something else), and the names timm's ``act_layer`` strings use for them.
_BY_CLASS = {ACTIVATIONS[name].module: ACTIVATIONS[name] for name in FUSED_ACTIVATIONS}
_BY_NAME = {alias: entry for entry in _BY_CLASS.values() for alias in (entry.name, *entry.aliases)}


def activation_spec(
    act: str | type[nn.Module] | nn.Module | None, act_kwargs: dict[str, Any] | None = None
) -> tuple[str, float | None]:
    """``(activation, activation_param)`` for a torch.nn activation given as a module,
    a class or a name (timm's ``act_layer`` spellings: "relu", "silu", "swish", ...),
    with ``act_kwargs`` the keywords a class or name would be built with.

    ``None`` means no activation. A PReLU module gives no parameter: its slopes are state
    (``act.weight``) and travel with the state dict.

    Args:
        act: a torch.nn activation module, its class, a timm ``act_layer`` name, or None.
        act_kwargs: the keywords a class or name would be built with; the parameter is read
            from its keyword (``negative_slope``, ``alpha``). Default None.

    Returns:
        ``(activation, activation_param)``: the fused layers' activation name and its
        parameter (None for the activation's default).

    Raises:
        ValueError: an activation the fused layers do not compute (GELU, hard-swish, ...).
    """
    if act is None:
        return "identity", None
    if isinstance(act, str):
        entry = _BY_NAME.get(act.lower())
        if entry is None:
            raise InputError(
                f"activation {act!r} has no fused normlab form; supported names: {', '.join(sorted(_BY_NAME))}"
            )
    else:
        cls = act if isinstance(act, type) else type(act)
        entry = _BY_CLASS.get(cls)
        if entry is None:
            raise InputError(
                f"activation {cls.__module__}.{cls.__name__} has no fused normlab form; supported: "
                + ", ".join(f"torch.nn.{c.__name__}" for c in _BY_CLASS)
            )
        if isinstance(act, nn.Module):
            # a constant parameter has its keyword, the module's attribute
            return entry.name, float(getattr(act, cast(str, entry.param_keyword))) if entry.constant_param else None
    keyword = entry.param_keyword
    return entry.name, (act_kwargs or {}).get(keyword) if keyword else None


if TYPE_CHECKING:

    class _NormLayer(nn.Module):
        """What :class:`_ActMixin` is mixed into: a normlab norm layer, which resets its parameters."""

        def reset_parameters(self) -> None: ...

else:
    _NormLayer = object


_NORM_KEYWORDS = ("bias", "unbiased_running_var", "on_nonfinite")  # the plain BatchNorm's keyword-only arguments


class _ActMixin(_NormLayer):
    """The activation choice and its module, shared by the fused layers."""

    activation: str
    activation_param: float
    inplace: bool
    act: nn.Module

    def _init_activation(
        self,
        channels: int,
        activation: str,
        activation_param: float | None,
        inplace: bool,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
    ) -> None:
        self.activation = activation
        self.activation_param = check_activation(activation, activation_param, inplace=inplace)
        self.inplace = bool(inplace)
        self.act = ACTIVATIONS[activation].make_module(self.activation_param, channels)
        if device is not None or dtype is not None:
            self.act.to(device=device, dtype=dtype)

    def _check_norm_keywords(self, kwargs: dict[str, Any]) -> None:
        """The keywords passed on to the plain norm, checked here so that a wrong one names the
        class the user built (Python's own error would name the norm's ``__init__``)."""
        for name in kwargs:
            if name not in _NORM_KEYWORDS:
                raise InputTypeError(
                    f"{type(self).__name__}.__init__() got an unexpected keyword argument {name!r}; "
                    f"its keyword-only arguments are activation, activation_param, inplace, "
                    f"{', '.join(_NORM_KEYWORDS)}"
                )

    def reset_parameters(self) -> None:
        """The norm's reset, and PReLU's slope back to its initial value."""
        super().reset_parameters()
        act = self.__dict__.get("_modules", {}).get("act")  # absent while the norm is built
        if isinstance(act, nn.PReLU):
            with torch.no_grad():
                act.weight.fill_(self.activation_param)

    def extra_repr(self) -> str:  # the norm's, then the activation's choice
        text = super().extra_repr() + f", activation={self.activation!r}"
        if ACTIVATIONS[self.activation].constant_param:
            text += f", activation_param={self.activation_param}"
        return text + (", inplace=True" if self.inplace else "")


_ACT_ARGS = """
    Args:
        {first_arg}
        {plain_args}: as for :class:`{plain}`.
        activation: keyword-only. "relu" (default), "leaky_relu", "elu", "silu", "prelu" or
            "identity".
        activation_param: keyword-only. LeakyReLU's slope (default 0.01), ELU's alpha (1.0),
            PReLU's initial slope (0.25).
        inplace: keyword-only. In-Place Activated BatchNorm (Rota Bulò et al., 2018): the
            output is written over the input and is all that is kept for backward, where the
            input is recovered by inverting the activation and the affine. Needs an invertible
            activation (identity, leaky_relu, elu). The input must not be needed elsewhere —
            autograd raises if it is (``docs/conventions.md#in-place-mode-inplacetrue-on-batchnormactgroupnormact``).
        {extra}

    Raises:
        ValueError: an unknown activation, or ``inplace=True`` with one that cannot be inverted.
"""

_BN_ARGS = {
    "first_arg": "num_features: C, the number of channels.",
    "plain_args": "eps, momentum, affine, track_running_stats, device, dtype",
    "extra": "**kwargs: the plain norm's keyword-only ``bias``, ``unbiased_running_var`` and ``on_nonfinite``.",
}


class _BatchNormAct(_ActMixin):
    _operation = "batch_norm_act"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
        *,
        activation: str = "relu",
        activation_param: float | None = None,
        inplace: bool = False,
        **kwargs: Any,
    ) -> None:
        self._check_norm_keywords(kwargs)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self._init_activation(num_features, activation, activation_param, inplace, device, dtype)


class BatchNormAct1d(_BatchNormAct, BatchNorm1d):
    __doc__ = "BatchNorm1d followed by an activation, fused; a drop-in for BatchNorm1d + act.\n" + _ACT_ARGS.format(
        plain="normlab.nn.BatchNorm1d", **_BN_ARGS
    )


class BatchNormAct2d(_BatchNormAct, BatchNorm2d):
    __doc__ = (
        "BatchNorm2d followed by an activation, fused: the Conv → BN → activation order in one pass.\n\n"
        "    Only the input is kept for backward (torch.nn's BatchNorm2d + LeakyReLU keeps two\n"
        "    full-size tensors), one tensor with ``inplace=True`` — the output, which the next\n"
        "    layer keeps anyway.\n" + _ACT_ARGS.format(plain="normlab.nn.BatchNorm2d", **_BN_ARGS)
    )


class BatchNormAct3d(_BatchNormAct, BatchNorm3d):
    __doc__ = "BatchNorm3d followed by an activation, fused.\n" + _ACT_ARGS.format(
        plain="normlab.nn.BatchNorm3d", **_BN_ARGS
    )


class GroupNormAct(_ActMixin, GroupNorm):
    __doc__ = "GroupNorm followed by an activation, fused.\n" + _ACT_ARGS.format(
        plain="normlab.nn.GroupNorm",
        first_arg="num_groups: G, which must divide ``num_channels``.",
        plain_args="num_channels, eps, affine, device, dtype",
        extra="bias: keyword-only. Learn β (only with ``affine``). Default True.",
    )
    _operation = "group_norm_act"

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
        *,
        activation: str = "relu",
        activation_param: float | None = None,
        inplace: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias)
        self._init_activation(num_channels, activation, activation_param, inplace, device, dtype)


def timm_norm_act(
    activation: str | type[nn.Module] | None,
    activation_param: float | None = None,
    *,
    num_groups: int | None = None,
    **norm_kwargs: Any,
) -> Callable[..., nn.Module]:
    """A ``norm_layer`` for timm models built from norm+activation layers (EfficientNet,
    RegNet, MobileNet, ...) that makes :class:`BatchNormAct2d` — or, with ``num_groups``,
    :class:`GroupNormAct` with that many groups (BiT's ResNetV2)::

        timm.create_model("efficientnet_b0", norm_layer=nl.nn.timm_norm_act("silu"))
        timm.create_model("resnetv2_50x1_bit", norm_layer=nl.nn.timm_norm_act("relu", num_groups=32))

    ``norm_layer=partial(nl.nn.GroupNormAct, 32)`` cannot work there: timm's norm-act lookup
    drops a partial's positional arguments and accepts classes only by identity with its own
    or by name, so it raises for any class it does not know.

    timm replaces a norm *class* by its own norm+act class, chosen by the class name
    (``norm_layer=nl.nn.BatchNorm2d`` silently yields timm's ``BatchNormAct2d``) and
    rejects names it does not know; a function it calls as is, with its norm+act
    keywords (``apply_act``, ``act_layer``, ``act_kwargs``, ``inplace``,
    ``drop_layer``). It does not pass the block's activation to a function, so name it
    here: the model's ``act_layer`` (SiLU for EfficientNet, ReLU for RegNet). A call that
    does pass ``act_layer`` uses that one; ``apply_act=False`` gives ``identity``.
    timm's ``inplace`` (the activation writing over its input) is ignored: the fused pass
    keeps no intermediate anyway. For a model that mixes activations, build it with
    timm's layers and convert with :func:`normlab.surgery.from_torch`, which reads each
    layer's own activation.

    Args:
        activation: the activation the layers apply unless timm passes its own
            ``act_layer``: a name, a torch.nn activation class, or None for none.
        activation_param: its parameter (LeakyReLU's slope, ELU's alpha, PReLU's initial
            slope); None for the activation's default.
        num_groups: keyword-only; build :class:`GroupNormAct` with this many groups instead
            of :class:`BatchNormAct2d`. Default None.
        **norm_kwargs: further keywords for every layer built; ``eps``, ``momentum``,
            ``affine`` and ``track_running_stats`` are defaults that a value in timm's own
            call overrides.

    Returns:
        A function timm calls as its ``norm_layer(num_features, ...)``.

    Raises:
        ValueError: an activation the fused layers do not compute.
    """
    default = activation_spec(activation, None)
    default = (default[0], activation_param if activation_param is not None else default[1])
    # eps, momentum, affine and track_running_stats given here are the defaults of the
    # layers built; a value timm's call passes (the model's own, as its act_layer) wins.
    # Left in norm_kwargs they reached the layer twice (TypeError: multiple values).
    # GroupNormAct has no running estimates: momentum or track_running_stats given for it
    # still reach it, and are refused there as GroupNorm refuses them.
    batch_only: dict[str, Any] = {
        k: norm_kwargs.pop(k) for k in ("momentum", "track_running_stats") if k in norm_kwargs
    }
    eps_default = norm_kwargs.pop("eps", 1e-5)
    affine_default = norm_kwargs.pop("affine", True)
    momentum_default = batch_only.get("momentum", 0.1)
    track_default = batch_only.get("track_running_stats", True)

    def norm_act_layer(
        num_features: int,
        eps: float = eps_default,
        momentum: float | None = momentum_default,
        affine: bool = affine_default,
        track_running_stats: bool = track_default,
        *,
        apply_act: bool = True,
        act_layer: str | type[nn.Module] | nn.Module | None = None,
        act_kwargs: dict[str, Any] | None = None,
        inplace: bool | None = None,
        drop_layer: object = None,
        device: DeviceLike = None,
        dtype: DTypeLike = None,
        **kwargs: Any,
    ) -> BatchNormAct2d | GroupNormAct:
        if drop_layer is not None:
            raise InputError(
                f"drop_layer={drop_layer!r}: BatchNormAct2d fuses norm and activation with "
                "nothing between them; build the model with timm's layers instead"
            )
        if not apply_act:
            name, param = "identity", None
        elif act_layer is not None:
            name, param = activation_spec(act_layer, act_kwargs)
        else:
            name, param = default
        if num_groups is not None:
            return GroupNormAct(
                num_groups,
                num_features,
                eps,
                affine,
                device,
                dtype,
                activation=name,
                activation_param=param,
                **{**batch_only, **norm_kwargs, **kwargs},
            )
        return BatchNormAct2d(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            activation=name,
            activation_param=param,
            **{**norm_kwargs, **kwargs},
        )

    return norm_act_layer
