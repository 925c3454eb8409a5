"""normlab.core — the normalization computations and how each call runs; no ``nn.Module``.

* the math, in torch ops: grouped moments (:mod:`.moments`), the normalize forward and its
  closed-form backward (:mod:`.normalize`), masks (:mod:`.masked`), the fused activations and
  the in-place mode (:mod:`.activation`), the running-statistics policy and update
  (:mod:`.running`);
* one entry per norm family, called the same way by modules and functionals:
  :func:`channel_norm` (BatchNorm, InstanceNorm, GroupNorm; masked, with an activation, in
  place) and :func:`row_norm` (LayerNorm, RMSNorm, residual add; :func:`channel_layer_norm`
  for LayerNorm2d);
* the path rule (:mod:`.paths`) — the one place that decides, per call, between the compiled
  kernels, torch's native ops (:mod:`.native`) and normlab's composed ops (:mod:`.composed`);
* the compiled kernels (:mod:`.kernels`), their build and their registration as
  ``torch.ops.normlab.*``;
* input validation (:mod:`.checks`, :mod:`.call_checks`).

Everything above (functional, nn, surgery, ...) is built from these pieces; nothing here
imports from those layers. ``docs/architecture.md`` draws the picture.
"""

from types import ModuleType

from . import kernels
from .activation import (
    ACTIVATION_DEFAULTS,
    ACTIVATIONS,
    INVERTIBLE_ACTIVATIONS,
    apply_activation,
    check_activation,
    inplace_abn,
)
from .channel import channel_norm, instance_norm_layout, masked_channel_norm
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
from .composed import channel_view
from .kernels.cpu import available as kernels_available
from .masked import (
    check_mask,
    masked_moments,
    masked_normalize,
    masked_normalize_backward,
    masked_reference,
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
from .paths import Decision, backend, choose_path, record_dispatch, set_backend, use_backend
from .reference import reference_normalize
from .renorm import batch_renorm
from .row import add_row_norm, channel_layer_norm, channels_first_row_norm, row_norm
from .running import (
    NONFINITE_POLICIES,
    DecayStatistics,
    NonFiniteStatisticsError,
    RunningStatistics,
    RunningStats,
    check_nonfinite_policy,
    decay_from_momentum,
    from_decay_convention,
    momentum_from_decay,
    to_decay_convention,
    update_running_stats,
    update_running_stats_if,
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
    "Decision",
    "NonFiniteStatisticsError",
    "RunningStatistics",
    "RunningStats",
    "add_row_norm",
    "backend",
    "channel_layer_norm",
    "apply_activation",
    "batch_renorm",
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
    "channels_first_row_norm",
    "choose_path",
    "compute_dtype",
    "decay_from_momentum",
    "fast",
    "fast_available",
    "kernels",
    "kernels_available",
    "from_decay_convention",
    "inplace_abn",
    "instance_norm_layout",
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


#: The old name of :func:`kernels_available`.
fast_available = kernels_available


def __getattr__(name: str) -> ModuleType:
    # ``normlab.core.fast``: the old name of normlab.core.kernels.cpu, kept working
    if name == "fast":
        import importlib

        return importlib.import_module(".fast", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
