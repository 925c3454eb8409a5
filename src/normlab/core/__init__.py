"""normlab.core — pure tensor math, no ``nn.Module``.

Grouped moments, the normalize forward and its closed-form backward, the running-statistics
update, and input validation. Everything above (functional, nn, surgery, ...) is built from
these pieces; nothing here imports from those layers.
"""

from .checks import (
    LOW_PRECISION_DTYPES,
    check_eps,
    check_floating_input,
    check_momentum,
    check_param,
    check_positive_int,
    normalize_shape_arg,
)
from .moments import (
    CenteredMoments,
    Moments,
    centered_moments,
    compute_dtype,
    mean_square,
    mean_var,
    merge_moments,
    reduced_count,
)
from .normalize import (
    AcrossProcesses,
    BatchStatistics,
    NormStats,
    normalize,
    normalize_backward,
    normalize_batch,
    normalize_forward,
    normalize_given,
)
from .reference import reference_normalize
from .running import (
    NONFINITE_POLICIES,
    DecayStatistics,
    NonFiniteStatisticsError,
    RunningStatistics,
    check_nonfinite_policy,
    decay_from_momentum,
    from_decay_convention,
    momentum_from_decay,
    to_decay_convention,
    update_running_stats,
)

__all__ = [
    "LOW_PRECISION_DTYPES",
    "NONFINITE_POLICIES",
    "AcrossProcesses",
    "BatchStatistics",
    "CenteredMoments",
    "DecayStatistics",
    "Moments",
    "NormStats",
    "NonFiniteStatisticsError",
    "RunningStatistics",
    "check_eps",
    "check_floating_input",
    "check_momentum",
    "check_nonfinite_policy",
    "check_param",
    "check_positive_int",
    "centered_moments",
    "compute_dtype",
    "decay_from_momentum",
    "from_decay_convention",
    "mean_square",
    "mean_var",
    "merge_moments",
    "momentum_from_decay",
    "normalize",
    "normalize_backward",
    "normalize_batch",
    "normalize_forward",
    "normalize_given",
    "normalize_shape_arg",
    "reduced_count",
    "reference_normalize",
    "to_decay_convention",
    "update_running_stats",
]
