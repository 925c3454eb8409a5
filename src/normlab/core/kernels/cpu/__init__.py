"""normlab.core.fast — the compiled float32 CPU kernels, built on first use, and the
PyTorch operators (``torch.ops.normlab.*``) that wrap them. Which path a call takes is
decided in :mod:`normlab.core.dispatch`, not here."""

from .build import available, backend, kernels, record_dispatch, set_backend, status, use_backend
from .ops import ChannelPlan, channel_layout, channel_norm_inplace, plan_channel_norm

__all__ = [
    "ChannelPlan",
    "available",
    "backend",
    "channel_layout",
    "channel_norm_inplace",
    "kernels",
    "plan_channel_norm",
    "record_dispatch",
    "set_backend",
    "status",
    "use_backend",
]
