"""Deprecated: ``normlab.core.fast`` is now :mod:`normlab.core.kernels.cpu` (the compiled
kernels) and :mod:`normlab.core.paths` (the backend switches and the dispatch log). The old
names keep working here."""

import warnings

from .kernels.cpu import available, build, status
from .kernels.cpu.build import load as kernels
from .paths import backend, record_dispatch, set_backend, use_backend

warnings.warn(
    "normlab.core.fast is deprecated: use normlab.core.kernels.cpu (status, available) and "
    "normlab.core.set_backend / use_backend / record_dispatch",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["available", "backend", "build", "kernels", "record_dispatch", "set_backend", "status", "use_backend"]
