"""The state every norm layer shares: parameters, buffers, checkpoints, settings.

Modelled on torch.nn's ``_NormBase`` so that parameter and buffer names, shapes, dtypes,
defaults and the state-dict version are identical: a torch.nn checkpoint loads into a
normlab layer and back without loss. Subclasses choose input ranks; their forward is one
call of their family's entry (:func:`normlab.core.channel_norm`, :func:`normlab.core.row_norm`),
the same call the functionals make after their checks.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, TypedDict, TypeVar, cast

import torch
from torch import nn
from torch.fx import Proxy

from ..core import RunningStats, check_eps, check_momentum, check_nonfinite_policy, check_positive_int
from ..core.checks import InputError, InputTypeError
from ..core.types import DeviceLike, DTypeLike, FactoryKwargs

if TYPE_CHECKING:
    from typing_extensions import Self

    # A type checker sees each mixin below as a subclass of the torch.nn class it is always
    # mixed into (nn.Module; torch.nn's _NormBase for the statistics-tracking layers), so what
    # the mixin uses from there is typed; at run time the mixins stay plain classes.
    _Module = nn.Module
    _TorchNormBase = nn.modules.batchnorm._NormBase
else:
    _Module = _TorchNormBase = object

__all__ = [
    "INPUT_TYPES",
    "ChannelInput",
    "CheckedSettings",
    "FreezableNorm",
    "NormOptions",
    "PerSampleNorm",
    "TensorOrProxy",
    "_NormBase",
    "check_channel_input",
    "check_norm_args",
    "check_real",
    "init_channel_params",
    "reset_affine",
    "traced_call",
]


#: A layer's input and output: a tensor, or under ``torch.fx.symbolic_trace`` the Proxy that
#: stands for one (a forward given a Proxy returns :func:`traced_call`'s Proxy).
TensorOrProxy = TypeVar("TensorOrProxy", torch.Tensor, Proxy)


def traced_call(
    module: nn.Module,
    input: Proxy | torch.Tensor,
    mask: Proxy | torch.Tensor | None = None,
    *,
    more: tuple[Proxy | torch.Tensor, ...] = (),
) -> Proxy:
    """Record ``module(input, *more)`` as one ``call_module`` node under ``torch.fx.symbolic_trace``.

    torch.fx treats torch.nn's own layers as leaves; normlab's layers are recorded the same
    way, so a GraphModule calls the layer at run time and ``train()``/``eval()``/freezing
    keep working on the traced graph (tracing *into* the forward would bake in the mode).
    A ``mask`` of valid positions is recorded as the node's ``mask`` keyword; ``more``: the
    further positional inputs (a residual, the keys).

    Traced as the root itself (``symbolic_trace(layer)``), the layer cannot be its own
    submodule: the graph's root becomes a module holding it as ``layer`` (fx lets a trace
    replace its root), so the GraphModule's parameters are ``layer.weight``, ... where
    torch.nn's trace inlines the functional, with the mode fixed, under ``weight``.
    """
    # symbolic_trace's tracer (the base class lacks the root and module paths used here)
    tracer = cast(torch.fx.Tracer, next(a for a in (input, *more) if isinstance(a, Proxy)).tracer)
    kwargs = {} if mask is None else {"mask": mask}
    if module is tracer.root:
        holder = nn.Module()
        holder.layer = module
        tracer.root = holder
        tracer.submodule_paths = None
        return tracer.create_proxy("call_module", "layer", (input, *more), kwargs)
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (input, *more), kwargs)


def check_channel_input(module: nn.Module, input: object, ranks: tuple[int, ...], shape_words: str) -> None:
    """An (N, C, *spatial) input of an accepted rank with ``module.num_features`` channels."""
    name = type(module).__name__
    if not isinstance(input, torch.Tensor):
        raise InputTypeError(f"{name} expects a torch.Tensor, got {type(input).__name__}")
    if input.dim() not in ranks:
        raise InputError(
            f"{name} expects a {shape_words} input, got a {input.dim()}D tensor of shape {tuple(input.shape)}"
        )
    if input.shape[1] != module.num_features:
        raise InputError(
            f"{name}({module.num_features}) expects {module.num_features} channels at "
            f"input dim 1, got {input.shape[1]} (input shape {tuple(input.shape)})"
        )


#: The input types a forward's inline check passes (a subclass goes the checked way).
INPUT_TYPES = (torch.Tensor, nn.Parameter)


class ChannelInput(_Module):
    """The input check of the layers with ``num_features`` channels at dim 1: an
    (N, C, *spatial) tensor of one of the ranks in ``_ranks``."""

    num_features: int
    _ranks: tuple[int, ...] = ()
    _shape_words = ""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        # the common case in one expression; check_channel_input says what is wrong
        if not (type(input) in INPUT_TYPES and input.dim() in self._ranks and input.shape[1] == self.num_features):
            check_channel_input(self, input, self._ranks, self._shape_words)


class FreezableNorm(_Module):
    """The ``frozen`` flag every normlab norm layer carries.

    A frozen layer that keeps running estimates normalizes with them and never updates
    them — in ``train()`` mode too, which is what makes the freeze survive
    ``model.train()`` (the flag is read in ``forward``; ``train``/``eval`` never touch
    it). ``freeze(affine=True)`` also stops γ and β from requiring gradients. Layers
    whose statistics come from each sample (GroupNorm, LayerNorm, RMSNorm, or
    ``track_running_stats=False``) have no statistics to freeze; for them the flag
    freezes the affine parameters only.

    The flag is not part of ``state_dict`` (the keys stay torch.nn's); record it with
    the checkpoint if it matters, or use :class:`normlab.nn.FrozenBatchNorm2d`.
    """

    frozen: bool = False
    frozen_affine: bool = False
    _requires_grad_before_freeze: dict[str, bool]

    def freeze(self, affine: bool = True) -> Self:
        """Freeze the statistics (and γ/β when ``affine``); returns self."""
        if not self.frozen:
            self._requires_grad_before_freeze = {
                name: p.requires_grad for name, p in self.named_parameters(recurse=False)
            }
        self.frozen = True
        self.frozen_affine = bool(affine)
        for p in self.parameters(recurse=False):
            if affine:
                p.requires_grad_(False)
        return self

    def unfreeze(self) -> Self:
        """Undo :meth:`freeze`, restoring each parameter's ``requires_grad``; returns self."""
        before = getattr(self, "_requires_grad_before_freeze", {})
        for name, p in self.named_parameters(recurse=False):
            p.requires_grad_(before.get(name, p.requires_grad))
        self.frozen = False
        self.frozen_affine = False
        self._requires_grad_before_freeze = {}
        return self


class CheckedSettings(_Module):
    """Settings (``eps``, and for the tracking norms ``momentum``, ``on_nonfinite`` and
    ``unbiased_running_var``) checked once after each assignment — at the next call, before
    anything is updated — not on every call.

    Plain attributes, as torch.nn's (reading one costs nothing); assigning one of
    :attr:`_settings` marks the layer unchecked, and its next call checks them
    (:meth:`_check_settings`) and, for a tracking norm, builds its running-statistics policy
    anew. ``None`` is an accepted eps where the layer allows it (RMSNorm).
    """

    _settings: tuple[str, ...] = ("eps",)
    _eps_may_be_none = False

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)  # type: ignore[arg-type]  # torch types it Tensor | Module; any value is stored
        if name in self._settings:
            self.__dict__["_settings_checked"] = False

    def _check_settings(self) -> None:
        d = self.__dict__
        if not (d["eps"] is None and self._eps_may_be_none):
            eps = check_eps(d["eps"])
            if type(d["eps"]) is not float:  # a NumPy float, an int: the float the kernels take
                d["eps"] = eps
        if torch.compiler.is_compiling():
            # Checked while tracing, so the compiled code pays nothing; the flag is not set
            # here, as the compiler would guard on it and compile again the call after it flips.
            return
        d["_settings_checked"] = True

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this on each module before compiling it. torch.nn's norms
        # script; normlab's forwards take what TorchScript cannot type (a mask, fx proxies, the
        # path rule in Python): say so and what to do, not TorchScript's "Unknown type name".
        raise RuntimeError(
            f"{type(self).__name__}: torch.jit.script cannot compile normlab's layers; use torch.jit.trace, "
            "torch.compile or torch.export, or script their torch.nn twins: "
            "torch.jit.script(normlab.surgery.to_torch(model).model)"
        )


class PerSampleNorm(CheckedSettings, FreezableNorm):
    """GroupNorm, LayerNorm, LayerNorm2d and RMSNorm: statistics from each sample, eps checked
    once, and γ (and β) created and reset here, once for all four."""

    def _init_affine(
        self, shape: int | tuple[int, ...], affine: bool, bias: bool | None, device: DeviceLike, dtype: DTypeLike
    ) -> None:
        """Register ``weight`` and ``bias`` of ``shape`` (None where absent, as torch.nn's
        layers do) and reset them; ``bias=None``: the layer has no β at all (RMSNorm)."""
        factory: FactoryKwargs = {"device": device, "dtype": dtype}
        self.register_parameter("weight", nn.Parameter(torch.empty(shape, **factory)) if affine else None)
        if bias is not None:
            self.register_parameter("bias", nn.Parameter(torch.empty(shape, **factory)) if affine and bias else None)
        self.reset_parameters()
        # checked now (the constructor assigned eps last): a layer compiled before its first
        # eager call then guards on a flag that is already set, which that call cannot flip
        # (a compiled LayerNorm/GroupNorm otherwise compiled a second graph after one eager call)
        self._check_settings()

    def reset_parameters(self) -> None:
        """γ = 1 and β = 0."""
        reset_affine(self)


def init_channel_params(
    module: nn.Module,
    num_features: object,
    eps: object,
    extra: str,
    with_extra: bool,
    device: DeviceLike,
    dtype: DTypeLike,
) -> None:
    """The per-channel layers beyond the classic five (EvoNorm, FRN): ``module`` set up as
    an nn.Module, ``num_features`` and ``eps`` checked, γ and β of shape (C,) and a third
    per-channel parameter named ``extra`` (EvoNorm's v, FRN's τ; None without it), left for
    the layer's ``reset_parameters`` to fill."""
    nn.Module.__init__(module)
    channels = check_positive_int(num_features, "num_features")
    # torch types an attribute set on a Module as Tensor | Module; any value is stored
    module.num_features = channels  # type: ignore[assignment]
    module.eps = check_eps(eps)  # type: ignore[assignment]
    factory: FactoryKwargs = {"device": device, "dtype": dtype}
    module.weight = nn.Parameter(torch.empty(channels, **factory))
    module.bias = nn.Parameter(torch.empty(channels, **factory))
    setattr(module, extra, nn.Parameter(torch.empty(channels, **factory)) if with_extra else None)


def reset_affine(module: nn.Module) -> None:
    """γ = 1 and β = 0, for whichever of the two the layer has."""
    # a norm's γ and β: parameters, or None where the layer has none
    weight, bias = cast("torch.Tensor | None", module.weight), getattr(module, "bias", None)
    if weight is not None:
        nn.init.ones_(weight)
    if bias is not None:
        nn.init.zeros_(bias)


class NormOptions(TypedDict):
    """normlab's keyword-only constructor extras of the statistics-tracking layers, passed on
    as one (``**options``) by a layer that writes its own signature, as torch.nn passes on
    ``factory_kwargs``."""

    bias: bool
    unbiased_running_var: bool
    on_nonfinite: str


class _NormBase(ChannelInput, CheckedSettings, FreezableNorm, _TorchNormBase):
    """normlab's side of every statistics-tracking layer (BatchNorm, InstanceNorm, SyncBN).

    Mixed in *before* a torch.nn class (``class BatchNorm2d(_BatchNorm, nn.BatchNorm2d)``),
    so the layer is an instance of torch.nn's class: torch's ``_NormBase`` creates the same
    parameters, buffers and state-dict version, and loads checkpoints (including old ones
    without ``num_batches_tracked``) exactly as torch.nn does. This mixin validates the
    arguments once, adds normlab's keyword-only extras, keeps the running-statistics policy
    (:class:`normlab.core.RunningStats`) and supplies the forward.
    """

    _settings = ("eps", "momentum", "on_nonfinite", "unbiased_running_var")

    # BatchNorm's constructor, written once as torch.nn writes it in its _NormBase: the layers
    # with the same arguments inherit it; those whose defaults or arguments differ
    # (InstanceNorm, BatchRenorm, SyncBatchNorm) write their own signature and call it.
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
        bias: bool = True,
        unbiased_running_var: bool = True,
        on_nonfinite: str = "skip",
    ) -> None:
        num_features, eps, momentum = check_norm_args(num_features, eps, momentum)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_normlab(bias=bias, unbiased_running_var=unbiased_running_var, on_nonfinite=on_nonfinite)

    def _make_running_stats(self) -> RunningStats:
        """The layer's running-statistics policy, after its settings are checked — once after
        each assignment of one of them. It reads the buffers from the layer's own ``_buffers``
        at every call (``.to()``, ``functional_call`` and export swap them there)."""
        self._check_settings()
        d = self.__dict__
        d["momentum"] = check_momentum(d["momentum"], allow_none=True)
        d["on_nonfinite"] = check_nonfinite_policy(d.get("on_nonfinite", "skip"))
        stats = RunningStats(self._buffers, d["momentum"], d.get("unbiased_running_var", True), d["on_nonfinite"])
        if not torch.compiler.is_compiling():
            d["_running_stats"] = stats
        return stats

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name in self._settings:
            self.__dict__.pop("_running_stats", None)

    def _init_normlab(self, *, bias: bool, unbiased_running_var: bool, on_nonfinite: str) -> None:
        """After torch's ``__init__``: drop β if asked, record the extras."""
        if self.affine and not bias:
            del self.bias
            self.register_parameter("bias", None)
        self.unbiased_running_var = bool(unbiased_running_var)
        self.on_nonfinite = on_nonfinite
        self._make_running_stats()

    def reset_parameters(self) -> None:
        """Reset the running statistics, γ = 1 and β = 0."""
        self.reset_running_stats()
        reset_affine(self)

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )
        if not self.unbiased_running_var:
            text += ", unbiased_running_var=False"
        if self.on_nonfinite != "skip":
            text += f", on_nonfinite={self.on_nonfinite!r}"
        if self.frozen:
            text += ", frozen=True"
        return text


def check_norm_args(num_features: object, eps: object, momentum: object) -> tuple[int, float, float | None]:
    """The constructor arguments every statistics-tracking layer validates once."""
    return (
        check_positive_int(num_features, "num_features"),
        check_eps(eps),
        check_momentum(momentum, allow_none=True),
    )


def check_real(value: object, name: str, accepted: str = "a float") -> float:
    """``float(value)`` for a real number that is not a bool, else InputTypeError naming ``name``.

    Typed ``object``: it checks what a caller passed for a ``float`` argument, whatever that was.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{name} must be {accepted}, got {value!r}")
    return float(value)
