"""normlab.core.fast — compiled float32 CPU kernels and the switch between them and the
composed torch ops (which stay the fallback and the test reference)."""

from .build import available, backend, kernels, record_dispatch, set_backend, status, use_backend
from .ops import ACTIVATIONS, INVERTIBLE, channel_norm, plan_channel_norm, row_norm

__all__ = [
    "ACTIVATIONS",
    "INVERTIBLE",
    "available",
    "backend",
    "channel_norm",
    "kernels",
    "plan_channel_norm",
    "record_dispatch",
    "row_norm",
    "set_backend",
    "status",
    "use_backend",
]
