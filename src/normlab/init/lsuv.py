"""LSUV: layer-sequential unit-variance initialization (Mishkin & Matas, 2016).

1. Give every Linear/Conv weight an orthonormal initialization.
2. In the order the layers run, feed a data batch through the model and rescale each
   layer's weight by 1/std of its output until |std − 1| < tol (or max_iters).

Each layer is adjusted with every earlier layer already final, so when the loop ends every
layer's output has unit standard deviation on that batch, whatever the depth or the
activation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core import InputError, InputTypeError
from .schemes import orthogonal_

__all__ = ["LSUVLayer", "lsuv_"]

_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class LSUVLayer:
    """What :func:`lsuv_` did to one layer.

    Attributes:
        name: the layer's qualified name in the model.
        scale: total factor the weight was multiplied by after the orthonormal init.
        iterations: forward passes spent on this layer.
        std: output std on the batch when done, over every call of the layer in one forward.
        converged: every call's output std is within ``tol`` of the target.
        call_stds: the output std of each call, in call order.
    """

    name: str
    scale: float
    iterations: int
    std: float
    converged: bool
    call_stds: tuple[float, ...] = ()


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    return [v for v in values if isinstance(v, torch.Tensor)]


def _forward(model: nn.Module, batch: Any) -> Any:
    with torch.no_grad():
        if isinstance(batch, (tuple, list)):
            return model(*batch)
        if isinstance(batch, dict):
            return model(**batch)
        return model(batch)


def _old_weight_norm(module: nn.Module) -> Any:
    """The hook of ``torch.nn.utils.weight_norm`` (the pre-parametrization API), if any:
    it recomputes ``weight`` from ``weight_g`` and ``weight_v`` before every forward."""
    from torch.nn.utils.weight_norm import WeightNorm

    return next((h for h in module._forward_pre_hooks.values() if isinstance(h, WeightNorm)), None)


def _set_weight(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Make ``value`` the weight the layer computes with — through a parametrization's
    ``right_inverse`` (``weight_norm``, ``orthogonal``: the stored tensors change so that
    the computed weight is ``value``) or the old weight-norm hook's ``g`` and ``v`` — not
    into a tensor the next forward recomputes."""
    with torch.no_grad():
        if parametrize.is_parametrized(module, "weight"):
            try:
                module.weight = value
            except NotImplementedError as err:
                raise InputError(
                    f"LSUV cannot set the weight of {name!r} ({type(module).__name__}): its parametrization "
                    f"{[type(p).__name__ for p in module.get_submodule('parametrizations.weight').children()]} has no right_inverse"
                ) from err
            return
        hook = _old_weight_norm(module)
        if hook is not None:
            module.get_parameter("weight_v").copy_(value)
            module.get_parameter("weight_g").copy_(torch.norm_except_dim(value, 2, hook.dim))
            return
        module.get_parameter("weight").copy_(value)


def _current_weight(module: nn.Module) -> torch.Tensor:
    hook = _old_weight_norm(module)
    if hook is not None:
        return torch._weight_norm(module.get_parameter("weight_v"), module.get_parameter("weight_g"), hook.dim).detach()
    weight = module.weight  # a Parameter, or the tensor a parametrization computes
    if not isinstance(weight, torch.Tensor):
        raise InputError(f"{type(module).__name__}.weight is not a tensor: LSUV cannot rescale it")
    return weight.detach()


def _valid(out: torch.Tensor, mask: torch.Tensor | None, name: str, module: nn.Module) -> torch.Tensor:
    """The output values at valid positions: ``mask`` covers a Linear output's leading
    dims (…, features) or a conv output without its channel dim (N, *spatial)."""
    if mask is None:
        return out.reshape(-1)
    if isinstance(module, nn.Linear):
        if mask.shape == out.shape[: mask.dim()] and mask.dim() < out.dim():
            return out[mask].reshape(-1)
        expected = f"the leading dims of its output {tuple(out.shape)}"
    else:
        if out.dim() > 2 and mask.shape == (out.shape[0], *out.shape[2:]):
            return out.movedim(1, -1)[mask].reshape(-1)
        expected = f"its output {tuple(out.shape)} without the channel dim"
    raise InputError(
        f"lsuv_ mask of shape {tuple(mask.shape)} does not fit layer {name!r} ({type(module).__name__}): "
        f"expected {expected}; give a mask that fits every Linear/Conv output, or none"
    )


def _stds(
    outs: list[torch.Tensor], mask: torch.Tensor | None, name: str, module: nn.Module
) -> tuple[float, tuple[float, ...]]:
    values = [_valid(o.float(), mask, name, module) for o in outs]
    pooled = torch.cat(values)
    if pooled.numel() < 2:
        raise InputError(
            f"lsuv_ needs at least 2 output values of layer {name!r} to estimate a standard deviation, "
            f"the batch gave {pooled.numel()}: use a larger batch"
        )
    per_call = tuple(v.std().item() if v.numel() > 1 else float("nan") for v in values)
    return pooled.std().item(), per_call


def lsuv_(
    model: nn.Module,
    batch: Any,
    tol: float = 0.1,
    max_iters: int = 10,
    *,
    target_std: float = 1.0,
    orthonormal: bool = True,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[LSUVLayer]:
    """Initialize ``model``'s Linear and Conv layers in place so that each outputs unit std
    (Mishkin & Matas, 2016: orthonormal init, then rescale layer by layer on a data batch).

    Args:
        model: the model; its Linear and Conv1d/2d/3d layers are initialized in place.
        batch: input for one forward pass (a tensor, or a tuple/dict of arguments).
        tol: stop when |output std − target_std| < tol; > 0. Default 0.1.
        max_iters: rescaling passes per layer at most; >= 1. Default 10.
        target_std: keyword-only; the output std to reach. Default 1.0.
        orthonormal: keyword-only; start from orthonormal weights (step 1); False keeps the
            current ones. Default True.
        mask: keyword-only; bool, True at valid positions (padding excluded from every std):
            shaped like the leading dims of Linear outputs (batch, time) and like conv outputs
            without their channel dim (N, *spatial).
        generator: keyword-only; the random generator of the orthonormal draw.

    Returns:
        One :class:`LSUVLayer` per layer, in execution order: the scale applied, the
        iterations it took, the output std and whether it converged. A layer called more
        than once per forward is rescaled by the std of all its outputs together, and counts
        as converged only if every call's std is within ``tol`` (``call_stds`` lists them);
        so are layers that hold one weight Parameter (tied), listed once under the first
        one's name. Layers that never run on the batch are left alone. Weights under a
        parametrization (``weight_norm``, also the older hook form) are set through it; a
        layer whose output does not change when its weight is scaled (``spectral_norm``) is
        left as it is, with a warning. The model's training flag is kept; the passes run in
        eval mode so that Dropout and BatchNorm running statistics are untouched.

    Raises:
        ValueError: ``tol`` <= 0, ``max_iters`` < 1, no Linear or Conv layer in ``model``, or
            a model or batch on the meta device.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(40, 100), torch.nn.Tanh(), torch.nn.Linear(100, 10))
        >>> report = nl.init.lsuv_(model, torch.randn(256, 40))
    """
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool):
        raise InputTypeError(f"mask must be a bool tensor (True = valid), got {getattr(mask, 'dtype', type(mask))}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _LAYER_TYPES)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv layer to initialize")
    if any(t.is_meta for t in (*model.parameters(), *_tensors(batch))):
        raise InputError(
            "lsuv_ measures output standard deviations on real data; the model or batch is on the meta "
            "device (shapes only): move both to a real device first (model.to_empty(device=...) and load weights)"
        )
    # Layers holding one weight Parameter (tied) are one weight to rescale: the first
    # layer that has it stands for them all, its outputs pooled with theirs.
    owner: dict[int, str] = {}
    for name, m in layers.items():
        owner.setdefault(id(m.weight) if not parametrize.is_parametrized(m, "weight") else id(m), name)
    group = {
        name: owner[id(m.weight) if not parametrize.is_parametrized(m, "weight") else id(m)]
        for name, m in layers.items()
    }
    if orthonormal:
        for name, m in layers.items():
            weight = _current_weight(m)
            _set_weight(m, name, orthogonal_(torch.empty_like(weight), generator=generator))

    order: list[str] = []
    outputs: dict[str, list[torch.Tensor]] = {}

    def watch(name: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            if name not in order:
                order.append(name)
            outputs.setdefault(name, []).append(out.detach())

        return hook

    def run() -> None:
        outputs.clear()
        _forward(model, batch)

    handles = [m.register_forward_hook(watch(group[name])) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    results: list[LSUVLayer] = []
    try:
        run()  # learn the execution order
        for name in list(order):
            module = layers[name]
            scale, iterations = 1.0, 0
            std, per_call = _stds(outputs[name], mask, name, module)
            while abs(std - target_std) >= tol and iterations < max_iters:
                if not std > 0 or not torch.isfinite(torch.tensor(std)):
                    break  # a dead or non-finite output cannot be rescaled
                factor = target_std / std
                unscaled = _current_weight(module).clone()
                _set_weight(module, name, unscaled * factor)
                scale *= factor
                iterations += 1
                run()
                previous, (std, per_call) = std, _stds(outputs[name], mask, name, module)
                if std == previous and abs(factor - 1) > 1e-3:
                    scale /= factor  # it had no effect: undone
                    _set_weight(module, name, unscaled)
                    warnings.warn(
                        f"lsuv_: scaling the weight of {name!r} does not change its output (its input is 0 on "
                        f"this batch, or a parametrization such as spectral_norm fixes its scale); left as it is",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    run()
                    std, per_call = _stds(outputs[name], mask, name, module)
                    break
            converged = all(abs(s - target_std) < tol for s in (std, *per_call))
            results.append(LSUVLayer(name, scale, iterations, std, converged, per_call))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return results
