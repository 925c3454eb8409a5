"""Fold Weight Standardization away for inference: a standardized convolution becomes a plain one.

StdConv2d recomputes Ŵ = (W − mean W)/√(var W + ε) (times a gain for ScaledStdConv2d) from its
weight on every call. At inference W no longer changes, so Ŵ can be computed once — in float64,
then cast — and put in an ``nn.Conv2d`` with the same configuration: one standardization pass
fewer per call, and a model of torch.nn layers only (which ``fold_batchnorm`` can then fold a
following BatchNorm into; it refuses to fold into a standardized convolution, whose
standardization would undo the scaling).
"""

from __future__ import annotations

from typing import Any, TypeGuard, cast

import torch
from torch import nn

from .. import nn as nln
from ..functional.weight_standardization import weight_standardization
from .modules import (
    class_label,
    compared,
    conv_config,
    copy_model,
    eval_max_abs_diff,
    hand_over_hooks,
    replace_everywhere,
)
from .report import SurgeryReport, SurgeryResult

__all__ = ["fold_weight_standardization", "standardizes_weight"]

_TIMM_NAMES = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")


def standardizes_weight(module: nn.Module) -> TypeGuard[nn.Conv2d]:
    """A convolution whose weight is standardized on every call (normlab's or timm's: both
    are ``nn.Conv2d`` subclasses with an ``eps``)."""
    if isinstance(module, (nln.StdConv2d, nln.ScaledStdConv2d)):
        return True
    return type(module).__module__.split(".")[0] == "timm" and type(module).__name__ in _TIMM_NAMES


def _standardized(module: nn.Conv2d) -> torch.Tensor:
    """Ŵ in float64, from the module's own weight, eps and (scaled) gain."""
    gain = getattr(module, "gain", None)
    if gain is not None:
        gain = gain.detach().double() * module.scale
    return weight_standardization(module.weight.detach().double(), cast(float, module.eps), gain=gain)


def fold_weight_standardization(model: nn.Module, example_input: Any = None) -> SurgeryResult:
    """Return an eval-mode copy of ``model`` with every standardized convolution (normlab's
    :class:`~normlab.nn.StdConv2d` and :class:`~normlab.nn.ScaledStdConv2d`, timm's ``StdConv2d``,
    ``ScaledStdConv2d`` and their ``*Same`` forms) replaced by an ``nn.Conv2d`` holding its
    standardized weight. A TensorFlow-style SAME padding computed per input has no ``nn.Conv2d``
    form: such layers are listed in ``report.skipped``. With ``example_input`` the two models
    are compared in eval mode (``report.max_abs_diff``).

    Args:
        model: the model to fold; it is not modified.
        example_input: one input (a tensor, or a tuple/dict of arguments) to compare the two models on;
            None for no check. Default None.

    Returns:
        ``(model, report)``: a :class:`SurgeryResult`, the copy in eval mode.
    """
    folded = copy_model(model).eval()
    report = SurgeryReport("fold_weight_standardization")
    for path, module in list(folded.named_modules()):
        if not standardizes_weight(module):
            continue
        if getattr(module, "same_pad", False):
            report.skip(path, "SAME padding computed from each input's size: a plain nn.Conv2d cannot express it")
            continue
        conv = nn.Conv2d(
            module.in_channels, module.out_channels, padding_mode=module.padding_mode, **conv_config(module)
        )
        with torch.no_grad():
            conv.weight.copy_(_standardized(module).to(conv.weight.dtype))
            if module.bias is not None and conv.bias is not None:  # conv_config gave conv a bias
                conv.bias.copy_(module.bias)
        conv.weight.requires_grad_(module.weight.requires_grad)
        if module.bias is not None and conv.bias is not None:
            conv.bias.requires_grad_(module.bias.requires_grad)
        conv.eval()
        hand_over_hooks(conv, module)  # a hook on the layer runs on its successor
        folded = replace_everywhere(folded, module, conv)  # a layer registered twice: under both names
        report.changed(path, "folded", class_label(module), class_label(conv), eps=module.eps)
    if example_input is not None:
        report.max_abs_diff = eval_max_abs_diff(model, folded, example_input)
        report.check = f"standardized in float64; {compared(report.max_abs_diff)}"
    else:
        report.check = "standardized in float64; no example_input, outputs not compared"
    return SurgeryResult(folded, report)
