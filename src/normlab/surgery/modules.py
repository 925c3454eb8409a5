"""Walking and rewriting module trees: paths, replacement, classification of norm layers."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .. import nn as nln

__all__ = [
    "NormInfo",
    "call_model",
    "class_label",
    "copy_model",
    "describe_norm",
    "eval_max_abs_diff",
    "module_factory_kwargs",
    "output_tensors",
    "replace_module",
]


def class_label(module: nn.Module) -> str:
    """'torch.nn.BatchNorm2d', 'normlab.nn.GroupNorm', or module.Class for anything else."""
    cls = type(module)
    if cls.__module__.startswith("torch.nn."):
        return f"torch.nn.{cls.__name__}"
    if cls.__module__.startswith("normlab.nn."):
        return f"normlab.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__name__}"


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy: surgery never modifies the model it was given."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    return copy.deepcopy(model)


def call_model(model: nn.Module, example_input):
    """model(x), model(*x) for a tuple/list, model(**x) for a dict."""
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


def output_tensors(output) -> list[torch.Tensor]:
    """Every tensor in a (possibly nested) model output."""
    return [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]


def eval_max_abs_diff(a: nn.Module, b: nn.Module, example_input) -> float:
    """Max |a(x) − b(x)| over all output tensors, both in eval mode, neither modified."""
    outputs = []
    for model in (a, b):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                outputs.append(output_tensors(call_model(model, example_input)))
        finally:
            model.train(was_training)
    return max(((x.double() - y.double()).abs().max().item() for x, y in zip(*outputs)), default=0.0)


def replace_module(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted ``path`` inside ``root`` (or return it if path is the root)."""
    if path == "":
        return new
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)
    return root


def module_factory_kwargs(module: nn.Module) -> dict:
    """device/dtype of a module's first floating parameter or buffer."""
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


@dataclass(frozen=True)
class NormInfo:
    """A channel norm layer seen through one lens, whichever library it comes from.

    kind: "batch", "instance", "group", "frozen", "batch_renorm"
    spatial_rank: from the class name (1d → 1 for (N, C, L)), or None where it does not say
    """

    kind: str
    spatial_rank: int | None
    channels: int
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None
    momentum: float | None
    source: str  # "normlab" or "torch" or "other"


_SPATIAL_RANK_BY_SUFFIX = {"1d": 1, "2d": 2, "3d": 3}


def _spatial_rank_from_name(module: nn.Module) -> int | None:
    return _SPATIAL_RANK_BY_SUFFIX.get(type(module).__name__[-2:])


def describe_norm(module: nn.Module) -> NormInfo | None:
    """NormInfo for channel norm layers (BatchNorm, InstanceNorm, GroupNorm, frozen,
    BatchRenorm — normlab's or torch.nn's); None for anything else, LayerNorm and
    RMSNorm included (they normalize trailing dims, not channels)."""
    name = type(module).__name__
    source = (
        "normlab"
        if type(module).__module__.startswith("normlab.")
        else ("torch" if type(module).__module__.startswith("torch.") else "other")
    )
    common = dict(
        spatial_rank=_spatial_rank_from_name(module),
        eps=float(getattr(module, "eps", 1e-5)),
        weight=getattr(module, "weight", None),
        bias=getattr(module, "bias", None),
        running_mean=getattr(module, "running_mean", None),
        running_var=getattr(module, "running_var", None),
        num_batches_tracked=getattr(module, "num_batches_tracked", None),
        momentum=getattr(module, "momentum", None),
        source=source,
    )
    if isinstance(module, (nln.BatchRenorm1d, nln.BatchRenorm2d, nln.BatchRenorm3d)):
        return NormInfo("batch_renorm", channels=module.num_features, **common)
    if isinstance(module, (nln.FrozenBatchNorm1d, nln.FrozenBatchNorm2d, nln.FrozenBatchNorm3d)) or (
        name.startswith("FrozenBatchNorm") and hasattr(module, "running_var")
    ):
        return NormInfo("frozen", channels=int(module.running_var.numel()), **common)
    if isinstance(module, (nln.BatchNorm1d, nln.BatchNorm2d, nln.BatchNorm3d, nn.modules.batchnorm._BatchNorm)):
        rank = common["spatial_rank"] if not isinstance(module, nn.SyncBatchNorm) else None
        return NormInfo("batch", channels=module.num_features, **{**common, "spatial_rank": rank})
    if isinstance(
        module, (nln.InstanceNorm1d, nln.InstanceNorm2d, nln.InstanceNorm3d, nn.modules.instancenorm._InstanceNorm)
    ):
        return NormInfo("instance", channels=module.num_features, **common)
    if isinstance(module, (nln.GroupNorm, nn.GroupNorm)):
        return NormInfo("group", channels=module.num_channels, **{**common, "spatial_rank": None})
    return None
