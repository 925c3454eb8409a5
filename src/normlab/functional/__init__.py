"""normlab.functional — the functional API, argument-compatible with ``torch.nn.functional``.

``batch_norm``, ``instance_norm``, ``group_norm``, ``layer_norm``, ``rms_norm`` take the
same positional arguments and defaults as their torch.nn.functional namesakes; extras are
keyword-only.
"""

import torch.fx as _fx

from .channels_first import layer_norm2d
from .evonorm import evonorm_b0, evonorm_batch, evonorm_s0, evonorm_sample
from .filter_response import filter_response_norm, tlu
from .fused_add import add_layer_norm, add_rms_norm
from .norm_act import norm_act
from .per_sample import group_norm, group_norm_act, layer_norm, rms_norm
from .scale_norm import scale_norm
from .squash import derf, dyt
from .switchable import switchable_norm
from .sync import sync_batch_norm
from .tracked import batch_norm, batch_norm_act, batch_renorm, instance_norm
from .weight_standardization import weight_standardization

__all__ = [
    "add_layer_norm",
    "add_rms_norm",
    "batch_norm",
    "batch_norm_act",
    "batch_renorm",
    "derf",
    "dyt",
    "evonorm_b0",
    "evonorm_batch",
    "evonorm_s0",
    "evonorm_sample",
    "filter_response_norm",
    "group_norm",
    "group_norm_act",
    "instance_norm",
    "layer_norm",
    "layer_norm2d",
    "norm_act",
    "rms_norm",
    "scale_norm",
    "switchable_norm",
    "sync_batch_norm",
    "tlu",
    "weight_standardization",
]

# torch.fx.symbolic_trace records each functional as one call_function node instead of
# tracing into it: the checks and the path choice then run on real tensors when the
# GraphModule is called, and normlab's modules (which call these by attribute) trace too.
for _name in __all__:
    _fx.wrap(_name)
del _name
