"""normlab.core — pure tensor math, no ``nn.Module``.

Grouped moments, the normalize forward and its closed-form backward, the running-statistics
update, and input validation. Everything above (functional, nn, surgery, ...) is built from
these pieces; nothing here imports from those layers.
"""

from . import fast
from .activation import (
    ACTIVATION_DEFAULTS,
    ACTIVATIONS,
    INVERTIBLE_ACTIVATIONS,
    apply_activation,
    check_activation,
    inplace_abn,
)
from .checks import (
    LOW_PRECISION_DTYPES,
    InputError,
    InputTypeError,
    check_eps,
    check_floating_input,
    check_momentum,
    check_param,
    check_positive_int,
    normalize_shape_arg,
)
from .dispatch import (
    add_row_norm,
    channel_layer_norm,
    channel_norm,
    channel_view,
    choose_path,
    masked_channel_norm,
    row_norm,
)
from .fast import available as fast_available
from .fast import record_dispatch, set_backend, use_backend
from .masked import (
    check_mask,
    masked_moments,
    masked_normalize,
    masked_normalize_backward,
    masked_reference,
    update_running_stats_if,
)
from .moments import (
    CenteredMoments,
    Moments,
    centered_moments,
    compute_dtype,
    mean_square,
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
    "ACTIVATIONS",
    "ACTIVATION_DEFAULTS",
    "INVERTIBLE_ACTIVATIONS",
    "LOW_PRECISION_DTYPES",
    "NONFINITE_POLICIES",
    "AcrossProcesses",
    "BatchStatistics",
    "CenteredMoments",
    "DecayStatistics",
    "InputError",
    "InputTypeError",
    "Moments",
    "NormStats",
    "NonFiniteStatisticsError",
    "RunningStatistics",
    "add_row_norm",
    "channel_layer_norm",
    "apply_activation",
    "check_activation",
    "check_eps",
    "check_floating_input",
    "check_mask",
    "check_momentum",
    "check_nonfinite_policy",
    "check_param",
    "check_positive_int",
    "centered_moments",
    "channel_norm",
    "channel_view",
    "choose_path",
    "compute_dtype",
    "decay_from_momentum",
    "fast",
    "fast_available",
    "from_decay_convention",
    "inplace_abn",
    "mean_square",
    "masked_channel_norm",
    "masked_moments",
    "masked_normalize",
    "masked_normalize_backward",
    "masked_reference",
    "merge_moments",
    "momentum_from_decay",
    "normalize",
    "normalize_backward",
    "normalize_batch",
    "normalize_forward",
    "normalize_given",
    "normalize_shape_arg",
    "record_dispatch",
    "reduced_count",
    "reference_normalize",
    "row_norm",
    "set_backend",
    "to_decay_convention",
    "update_running_stats",
    "update_running_stats_if",
    "use_backend",
]
