"""The state every statistics-tracking norm layer shares: parameters, buffers, checkpoints.

Modelled on torch.nn's ``_NormBase`` so that parameter and buffer names, shapes, dtypes,
defaults and the state-dict version are identical: a torch.nn checkpoint loads into a
normlab layer and back without loss. Subclasses only choose input ranks and the
functional they call.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import Proxy

from ..core import check_eps, check_momentum, check_nonfinite_policy, check_positive_int
from ..core.checks import InputError, InputTypeError

__all__ = [
    "CheckedEps",
    "FreezableNorm",
    "PerSampleNorm",
    "_NormBase",
    "check_channel_input",
    "check_norm_args",
    "reset_affine",
    "traced_call",
]


def traced_call(module: nn.Module, input: Proxy, mask: Proxy | torch.Tensor | None = None) -> Proxy:
    """Record ``module(input)`` as one ``call_module`` node under ``torch.fx.symbolic_trace``.

    torch.fx treats torch.nn's own layers as leaves; normlab's layers are recorded the same
    way, so a GraphModule calls the layer at run time and ``train()``/``eval()``/freezing
    keep working on the traced graph (tracing *into* the forward would bake in the mode).
    A ``mask`` of valid positions is recorded as the node's ``mask`` keyword.
    """
    tracer = input.tracer
    kwargs = {} if mask is None else {"mask": mask}
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (input,), kwargs)


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


class FreezableNorm:
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

    def freeze(self, affine: bool = True):
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

    def unfreeze(self):
        """Undo :meth:`freeze`, restoring each parameter's ``requires_grad``; returns self."""
        before = getattr(self, "_requires_grad_before_freeze", {})
        for name, p in self.named_parameters(recurse=False):
            p.requires_grad_(before.get(name, p.requires_grad))
        self.frozen = False
        self.frozen_affine = False
        self._requires_grad_before_freeze = {}
        return self


class CheckedEps:
    """``eps`` checked once after each assignment — at the next call — not on every call.

    For the per-sample norms (GroupNorm, LayerNorm, RMSNorm), whose forward then skips the
    checks their constructor made. ``None`` is accepted where the layer allows it (RMSNorm).
    """

    _eps_may_be_none = False

    @property
    def eps(self):
        return self.__dict__["_eps"]

    @eps.setter
    def eps(self, value) -> None:
        self.__dict__["_eps"] = value
        self.__dict__["_eps_checked"] = False

    def _check_eps(self) -> None:
        d = self.__dict__
        if torch.compiler.is_compiling():
            # Checked while tracing, so the compiled code pays nothing; the flag is neither
            # read nor set here, as the compiler would guard on it and compile again the call
            # after it flips.
            eps = d["_eps"]
            if not (eps is None and self._eps_may_be_none):
                checked = check_eps(eps)
                if type(eps) is not float:  # a NumPy float, an int: the float the kernels take
                    d["_eps"] = checked
            return
        if not d.get("_eps_checked", False):
            if not (d["_eps"] is None and self._eps_may_be_none):
                d["_eps"] = check_eps(d["_eps"])
            d["_eps_checked"] = True


class PerSampleNorm(CheckedEps, FreezableNorm):
    """GroupNorm, LayerNorm, LayerNorm2d and RMSNorm: statistics from each sample, eps checked
    once, and γ (and β) created and reset here, once for all four."""

    def _init_affine(self, shape, affine: bool, bias: bool | None, device, dtype) -> None:
        """Register ``weight`` and ``bias`` of ``shape`` (None where absent, as torch.nn's
        layers do) and reset them; ``bias=None``: the layer has no β at all (RMSNorm)."""
        factory = {"device": device, "dtype": dtype}
        self.register_parameter("weight", nn.Parameter(torch.empty(shape, **factory)) if affine else None)
        if bias is not None:
            self.register_parameter("bias", nn.Parameter(torch.empty(shape, **factory)) if affine and bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """γ = 1 and β = 0."""
        reset_affine(self)


def reset_affine(module: nn.Module) -> None:
    """γ = 1 and β = 0, for whichever of the two the layer has."""
    weight, bias = module.weight, getattr(module, "bias", None)
    if weight is not None:
        nn.init.ones_(weight)
    if bias is not None:
        nn.init.zeros_(bias)


class _NormBase(FreezableNorm):
    """normlab's side of every statistics-tracking layer (BatchNorm, InstanceNorm, SyncBN).

    Mixed in *before* a torch.nn class (``class BatchNorm2d(_BatchNorm, nn.BatchNorm2d)``),
    so the layer is an instance of torch.nn's class: torch's ``_NormBase`` creates the same
    parameters, buffers and state-dict version, and loads checkpoints (including old ones
    without ``num_batches_tracked``) exactly as torch.nn does. This mixin validates the
    arguments once, adds normlab's keyword-only extras and supplies the forward.
    """

    # eps, momentum and on_nonfinite are checked once after each assignment (at construction
    # or later, ``layer.momentum = 0.01``) — at the next call, before anything is updated —
    # rather than on every call.
    @property
    def momentum(self) -> float | None:
        return self.__dict__["_momentum"]

    @momentum.setter
    def momentum(self, value) -> None:
        self.__dict__["_momentum"] = value
        self.__dict__["_args_checked"] = False

    @property
    def eps(self) -> float:
        return self.__dict__["_eps"]

    @eps.setter
    def eps(self, value) -> None:
        self.__dict__["_eps"] = value
        self.__dict__["_args_checked"] = False

    @property
    def on_nonfinite(self) -> str:
        return self.__dict__["_on_nonfinite"]

    @on_nonfinite.setter
    def on_nonfinite(self, value) -> None:
        self.__dict__["_on_nonfinite"] = value
        self.__dict__["_args_checked"] = False

    def _check_args(self) -> None:
        """Validate eps, momentum and on_nonfinite if one was assigned since the last call."""
        if not self.__dict__.get("_args_checked", False):
            d = self.__dict__
            d["_eps"] = check_eps(d["_eps"])
            d["_momentum"] = check_momentum(d["_momentum"], allow_none=True)
            d["_on_nonfinite"] = check_nonfinite_policy(d.get("_on_nonfinite", "skip"))
            d["_args_checked"] = True

    def _init_normlab(self, *, bias: bool, unbiased_running_var: bool, on_nonfinite: str) -> None:
        """After torch's ``__init__``: drop β if asked, record the extras."""
        if self.affine and not bias:
            del self.bias
            self.register_parameter("bias", None)
        self.unbiased_running_var = bool(unbiased_running_var)
        self.on_nonfinite = on_nonfinite
        self._check_args()

    def reset_parameters(self) -> None:
        """Reset the running statistics, γ = 1 and β = 0."""
        self.reset_running_stats()
        reset_affine(self)

    # torch.nn's two rules for where a call's statistics come from. Its BatchNorm uses the
    # running estimates whenever they exist outside training and passes them only when it
    # uses or updates them; its InstanceNorm reads ``track_running_stats`` on every call and
    # always passes its buffers (switched off after construction, it normalizes each
    # instance by itself and keeps updating them). They differ only for a flag changed
    # after construction; each layer keeps torch's rule for its kind.
    _stats_follow_track_flag = False

    def _batch_stats(self) -> bool:
        """Whether this call normalizes with the batch's statistics: in training unless
        frozen, and whenever there are no running estimates to use."""
        if self._stats_follow_track_flag:
            return (self.training and not self.frozen) or not self.track_running_stats
        return (self.training and not self.frozen) or self.running_mean is None

    def _normalize(self, functional, input: torch.Tensor, **kwargs) -> torch.Tensor:
        """``functional(input, running_mean, running_var, weight, bias, batch_stats, momentum,
        eps, ...)`` — batch_norm's signature — with the statistics this call uses: the
        running estimates passed are updated when ``batch_stats``, and only then is the batch
        counter passed."""
        self._check_args()
        batch_stats = self._batch_stats()
        if self._stats_follow_track_flag or not batch_stats or self.track_running_stats:
            running_mean, running_var = self.running_mean, self.running_var
        else:  # BatchNorm passes no estimates it neither uses nor updates
            running_mean = running_var = None
        return functional(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            batch_stats,
            self.momentum,
            self.eps,
            num_batches_tracked=self.num_batches_tracked if batch_stats and running_mean is not None else None,
            unbiased_running_var=self.unbiased_running_var,
            on_nonfinite=self.on_nonfinite,
            **kwargs,
        )

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
