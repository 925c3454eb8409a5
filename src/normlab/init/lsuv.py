"""LSUV: layer-sequential unit-variance initialization (Mishkin & Matas, 2016).

1. Give every Linear/Conv weight an orthonormal initialization.
2. In the order the layers run, feed a data batch through the model and rescale each
   layer's weight by 1/std of its output until |std − 1| < tol (or max_iters).

Each layer is adjusted with every earlier layer already final, so when the loop ends every
layer's output has unit standard deviation on that batch, whatever the depth or the
activation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .schemes import orthogonal_

__all__ = ["LSUVLayer", "lsuv_"]

_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class LSUVLayer:
    name: str
    scale: float  # total factor the weight was multiplied by after orthonormal init
    iterations: int  # forward passes spent on this layer
    std: float  # output std on the batch when done
    converged: bool


def _forward(model, batch):
    with torch.no_grad():
        if isinstance(batch, (tuple, list)):
            return model(*batch)
        if isinstance(batch, dict):
            return model(**batch)
        return model(batch)


def lsuv_(
    model: nn.Module,
    batch,
    tol: float = 0.1,
    max_iters: int = 10,
    *,
    target_std: float = 1.0,
    orthonormal: bool = True,
    generator: torch.Generator | None = None,
) -> list[LSUVLayer]:
    """Initialize ``model``'s Linear and Conv layers in place so that each outputs unit std.

    Args:
        batch: input for one forward pass (a tensor, or a tuple/dict of arguments).
        tol: stop when |output std − target_std| < tol.
        max_iters: rescaling passes per layer at most.
        orthonormal: start from orthonormal weights (step 1); False keeps the current ones.

    Returns one :class:`LSUVLayer` per layer, in execution order: the scale applied and the
    iterations it took. Layers that never run on the batch are left alone. The model's
    training flag is kept; the passes run in eval mode so that Dropout and BatchNorm
    running statistics are untouched.
    """
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _LAYER_TYPES)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv layer to initialize")
    if orthonormal:
        for m in layers.values():
            orthogonal_(m.weight, generator=generator)

    order: list[str] = []
    outputs: dict[str, torch.Tensor] = {}

    def watch(name):
        def hook(module, args, out):
            if name not in order:
                order.append(name)
            outputs[name] = out.detach()

        return hook

    handles = [m.register_forward_hook(watch(name)) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    results = []
    try:
        _forward(model, batch)  # learn the execution order
        for name in list(order):
            weight = layers[name].weight
            scale, iterations = 1.0, 0
            std = outputs[name].std().item()
            while abs(std - target_std) >= tol and iterations < max_iters:
                if not std > 0 or not torch.isfinite(torch.tensor(std)):
                    break  # a dead or non-finite output cannot be rescaled
                factor = target_std / std
                with torch.no_grad():
                    weight.mul_(factor)
                scale *= factor
                iterations += 1
                _forward(model, batch)
                std = outputs[name].std().item()
            results.append(LSUVLayer(name, scale, iterations, std, abs(std - target_std) < tol))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return results
