"""normlab.surgery — whole-model transforms, each a pure function.

Every transform returns ``SurgeryResult(model, report)``: a new model (the input is never
modified) and a :class:`SurgeryReport` of what changed, what was skipped and why, and —
where it can be checked numerically — the max difference it made.

    fold_batchnorm      eval-mode BatchNorm folded into the preceding conv/linear
    freeze_norms        statistics (and γ/β) frozen in a way model.train() cannot undo
    unfreeze_norms      the inverse
    convert_norms       batch ↔ group ↔ layer ↔ instance ↔ frozen ↔ batch_renorm, and to
                        dyt, derf, frn, evonorm_b0, evonorm_s0, group_ws
    fold_weight_standardization   standardized convolutions baked into plain Conv2d
    precise_bn          exact population statistics recomputed over the data
    from_torch/to_torch swap torch.nn norm layers for normlab's twins and back
    convert_sync_batchnorm / revert_sync_batchnorm   BatchNorm <-> SyncBatchNorm (any backend)
    load_decay_statistics   Keras/Flax BatchNorm state into a PyTorch-convention layer
"""

from .convert import TARGETS, auto_groups, convert_norms
from .convert_beyond import convert_convs_to_std
from .fold import bn_affine, fold_batchnorm
from .fold_ws import fold_weight_standardization
from .freeze import freeze_norms, unfreeze_norms
from .fuse_act import FusedActivation
from .interop import TWINS, from_torch, load_decay_statistics, to_torch
from .precise import default_forward, precise_bn
from .report import Change, Skip, SurgeryReport, SurgeryResult
from .sync import convert_sync_batchnorm, revert_sync_batchnorm

__all__ = [
    "TARGETS",
    "TWINS",
    "Change",
    "FusedActivation",
    "Skip",
    "SurgeryReport",
    "SurgeryResult",
    "auto_groups",
    "bn_affine",
    "convert_convs_to_std",
    "convert_norms",
    "convert_sync_batchnorm",
    "default_forward",
    "fold_batchnorm",
    "fold_weight_standardization",
    "freeze_norms",
    "from_torch",
    "load_decay_statistics",
    "precise_bn",
    "revert_sync_batchnorm",
    "to_torch",
    "unfreeze_norms",
]
