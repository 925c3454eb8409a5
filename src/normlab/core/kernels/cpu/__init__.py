"""normlab.core.kernels.cpu — the compiled float32 CPU kernels.

C++ sources by concern: ``activation.h`` (the fused activations, element by element),
``loops.h`` (what every loop shares: blocks, shifts, streaming stores), ``channel_passes.cpp``
and ``channel.cpp`` (BatchNorm/GroupNorm/InstanceNorm: the two-pass and the fused per-group
routes, and the whole operations), ``group_columns.cpp`` (channels_last GroupNorm fused a
sample at a time), ``masked_passes.h`` and ``masked.cpp`` (the same norms over
a mask's valid positions: the shared pieces and the per-pass route; the fused route and the
entries), ``row.cpp`` (LayerNorm/RMSNorm and the residual add),
``running.cpp`` (the running-estimate update inside a call), ``plan.h`` (how tensors map
onto the kernels), ``autograd.cpp`` (the C++ autograd nodes of eager calls) and ``entries.cpp``
(what Python calls: one eager entry per family, the operators' bodies, the module's bindings).
They compile as two translation units, ``unit_kernels.cpp`` and ``unit_python.cpp``, which
include them (torch's headers parsed twice, not seven times).

Python: :mod:`.build` compiles and loads them (on first use, cached per torch installation),
:mod:`.operators` registers them as ``torch.ops.normlab.*`` for traced code,
:mod:`.inplace` is the in-place mode, :mod:`.double_backward` the second derivatives.

Which calls run here is decided by the path rule (:mod:`normlab.core.paths`), not here.
"""

from . import build, operators
from .build import available, load, status
from .inplace import channel_norm_inplace

__all__ = ["available", "build", "channel_norm_inplace", "load", "operators", "status"]
