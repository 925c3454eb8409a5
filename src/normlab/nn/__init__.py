"""normlab.nn — modules that are drop-in replacements for torch.nn's norm layers.

Same constructor arguments and defaults, same parameter/buffer names and state-dict
version, so checkpoints load both ways without loss. Each layer is an instance of its
torch.nn class (``nl.nn.BatchNorm2d`` of ``torch.nn.BatchNorm2d``; ``SyncBatchNorm`` of
torch's ``_BatchNorm`` base only, since DistributedDataParallel refuses
``torch.nn.SyncBatchNorm`` on the CPU), so ``isinstance``-based code finds them;
:data:`NORM_LAYERS` and :func:`is_norm_layer` cover every normalization class of both.

Beyond the classic five (``docs/beyond.md``): ``StdConv2d``, ``ScaledStdConv2d``, FRN
(``FilterResponseNorm2d``, ``FilterResponseNormTlu2d``, ``FilterResponseNormAct2d``, ``TLU``),
``EvoNormB0`` … ``EvoNormS2a``, ``SwitchableNorm2d``, ``DyT``, ``Derf``, ``ScaleNorm`` and
``QKNorm`` — timm's constructors and state-dict keys where timm has the layer.
"""

from __future__ import annotations

from torch import nn as _torch_nn

from .base import FreezableNorm, _NormBase
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .batchrenorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, RenormSchedule
from .evonorm import EVONORM_LAYERS as _EVONORM_LAYERS
from .evonorm import (
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
from .filter_response import TLU, FilterResponseNorm2d, FilterResponseNormAct2d, FilterResponseNormTlu2d
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, _FrozenBatchNorm
from .fused_add import AddLayerNorm, AddRMSNorm
from .groupnorm import GroupNorm
from .instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .layernorm import LayerNorm, RMSNorm
from .layernorm2d import LayerNorm2d
from .normact import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, GroupNormAct, activation_spec, timm_norm_act
from .qk_norm import QKNorm
from .scale_norm import ScaleNorm
from .squash import Derf, DyT
from .std_conv import ScaledStdConv2d, StdConv2d
from .switchable import SwitchableNorm2d
from .syncbatchnorm import SyncBatchNorm, SyncBatchNormAct

#: normlab's normalization layers beyond the classic five that no torch.nn class covers (the
#: standardized convolutions are convolutions, TLU an activation and QKNorm a pair of norms).
BEYOND_NORM_LAYERS: tuple[type, ...] = (
    FilterResponseNorm2d,
    FilterResponseNormTlu2d,
    FilterResponseNormAct2d,
    *_EVONORM_LAYERS,
    DyT,
    Derf,
    ScaleNorm,
)

#: Every normalization module class, normlab's and torch.nn's.
NORM_LAYERS: tuple[type, ...] = (
    BEYOND_NORM_LAYERS
    + (
        _NormBase,
        _FrozenBatchNorm,
        GroupNorm,
        LayerNorm,
        RMSNorm,
        _torch_nn.modules.batchnorm._NormBase,
        _torch_nn.GroupNorm,
        _torch_nn.LayerNorm,
        _torch_nn.LocalResponseNorm,
    )
    + ((_torch_nn.RMSNorm,) if hasattr(_torch_nn, "RMSNorm") else ())
)


def is_norm_layer(module: _torch_nn.Module) -> bool:
    """True for any normlab or torch.nn normalization layer.

    Args:
        module: the module to test (an instance of one of ``NORM_LAYERS``).
    """
    return isinstance(module, NORM_LAYERS)


__all__ = [
    "BEYOND_NORM_LAYERS",
    "NORM_LAYERS",
    "AddLayerNorm",
    "AddRMSNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FreezableNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GroupNorm",
    "GroupNormAct",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LayerNorm2d",
    "RMSNorm",
    "RenormSchedule",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "Derf",
    "DyT",
    "EvoNormB0",
    "EvoNormB1",
    "EvoNormB2",
    "EvoNormS0",
    "EvoNormS0a",
    "EvoNormS1",
    "EvoNormS1a",
    "EvoNormS2",
    "EvoNormS2a",
    "FilterResponseNorm2d",
    "FilterResponseNormAct2d",
    "FilterResponseNormTlu2d",
    "QKNorm",
    "ScaleNorm",
    "ScaledStdConv2d",
    "StdConv2d",
    "SwitchableNorm2d",
    "TLU",
    "activation_spec",
    "is_norm_layer",
    "timm_norm_act",
]
