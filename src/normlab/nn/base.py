"""The state every statistics-tracking norm layer shares: parameters, buffers, checkpoints.

Modelled on torch.nn's ``_NormBase`` so that parameter and buffer names, shapes, dtypes,
defaults and the state-dict version are identical: a torch.nn checkpoint loads into a
normlab layer and back without loss. Subclasses only choose input ranks and the
functional they call.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core import check_eps, check_momentum, check_nonfinite_policy, check_positive_int

__all__ = ["FreezableNorm", "_NormBase", "check_channel_input"]


def check_channel_input(
    module: nn.Module, input: object, ranks: tuple[int, ...], shape_words: str
) -> None:
    """An (N, C, *spatial) input of an accepted rank with ``module.num_features`` channels."""
    name = type(module).__name__
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(input).__name__}")
    if input.dim() not in ranks:
        raise ValueError(
            f"{name} expects a {shape_words} input, got a {input.dim()}D tensor of shape "
            f"{tuple(input.shape)}"
        )
    if input.shape[1] != module.num_features:
        raise ValueError(
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


class _NormBase(FreezableNorm, nn.Module):
    """Common base of normlab's BatchNorm and InstanceNorm layers."""

    # Version 2 added num_batches_tracked; the same numbering as torch.nn, so checkpoint
    # metadata means the same thing in both libraries.
    _version = 2

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        unbiased_running_var: bool = True,
        on_nonfinite: str = "skip",
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = check_positive_int(num_features, "num_features")
        self.eps = check_eps(eps)
        self.momentum = check_momentum(momentum, allow_none=True)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.unbiased_running_var = bool(unbiased_running_var)
        self.on_nonfinite = check_nonfinite_policy(on_nonfinite)
        if self.affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batches seen."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics, γ = 1 and β = 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        raise NotImplementedError

    @property
    def _uses_batch_stats(self) -> bool:
        """Normalize with this batch: in training unless frozen, and whenever there
        are no running estimates to use."""
        return (self.training and not self.frozen) or self.running_mean is None

    def _update_kwargs(self) -> dict:
        """Keyword-only extras passed to the functional when running stats are updated."""
        return {
            "num_batches_tracked": self.num_batches_tracked,
            "unbiased_running_var": self.unbiased_running_var,
            "on_nonfinite": self.on_nonfinite,
        }

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

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ) -> None:
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            # Checkpoints from before version 2 have no num_batches_tracked; start at 0.
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
            error_msgs,
        )
