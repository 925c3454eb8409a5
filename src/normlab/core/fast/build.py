"""Build (on first use) and load the C++ kernels; choose between fast and composed paths.

The kernels are compiled once per machine by ``torch.utils.cpp_extension`` (about 15 s,
needs a C++ compiler and the ``ninja`` package) and cached under
``~/.cache/torch_extensions``. If anything about that fails, normlab says so once and
keeps using the composed torch ops — the same results, slower.

    normlab.core.fast.status()            # "fast kernels loaded from ...", or why not
    normlab.core.set_backend("composed")  # force a path: "auto" (default), "fast", "composed"
    with normlab.core.use_backend("composed"): ...
    with normlab.core.record_dispatch() as log: model(x)   # which path each call took

``NORMLAB_BACKEND=composed`` in the environment never builds anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import threading
import warnings
from pathlib import Path

__all__ = ["available", "backend", "kernels", "record_dispatch", "set_backend", "status", "use_backend"]

_SOURCE = Path(__file__).with_name("kernels.cpp")
_BACKENDS = ("auto", "fast", "composed")
_state = {"module": None, "error": None, "tried": False, "backend": os.environ.get("NORMLAB_BACKEND", "auto")}
_lock = threading.Lock()
_logs: list[list] = []

if _state["backend"] not in _BACKENDS:
    warnings.warn(f"NORMLAB_BACKEND={_state['backend']!r} is not one of {_BACKENDS}; using 'auto'", stacklevel=1)
    _state["backend"] = "auto"


def _cpu_signature() -> str:
    """Kernels are built with -march=native: key the build to this CPU."""
    model = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                model += line
    except OSError:
        pass
    return hashlib.sha1(model.encode()).hexdigest()[:10]


def _build():
    import torch
    from torch.utils import cpp_extension

    try:  # cpp_extension runs `ninja`; the pip package puts it beside the interpreter
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    source_hash = hashlib.sha1(_SOURCE.read_bytes()).hexdigest()[:10]
    name = f"normlab_kernels_{source_hash}_{_cpu_signature()}_{torch.__version__.split('+')[0].replace('.', '_')}"
    kwargs = {}
    if os.environ.get("NORMLAB_BUILD_DIR"):
        kwargs["build_directory"] = os.environ["NORMLAB_BUILD_DIR"]
        Path(kwargs["build_directory"]).mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(_SOURCE)],
        # -fopenmp: at::parallel_for's OpenMP branch is inline in ATen's headers, so without
        # it the kernels would run on one thread. libgomp.so.1 resolves to the copy torch has
        # already loaded, so there is one thread pool, sized by torch.set_num_threads. No
        # -ffast-math: NaN and inf behave exactly as IEEE says.
        extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-std=c++17"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
        **kwargs,
    )


def kernels():
    """The compiled module, or None when unavailable (or the backend is "composed")."""
    if _state["backend"] == "composed":
        return None
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                try:
                    _state["module"] = _build()
                except Exception as err:  # no compiler, no ninja, a read-only cache, ...
                    _state["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
                    warnings.warn(
                        f"normlab: the fast CPU kernels could not be built ({_state['error']}); "
                        f"using composed torch ops (same results, slower). "
                        f"normlab.core.fast.status() has the details.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                _state["tried"] = True
    if _state["module"] is None and _state["backend"] == "fast":
        raise RuntimeError(f"backend 'fast' was forced but the kernels are unavailable: {_state['error']}")
    return _state["module"]


def available() -> bool:
    """Whether the fast kernels can be used here (builds them on the first call)."""
    return kernels() is not None


def status() -> str:
    if _state["backend"] == "composed":
        return "composed torch ops (backend forced to 'composed')"
    module = kernels()
    if module is None:
        return f"composed torch ops: the fast kernels are unavailable ({_state['error']})"
    return f"fast kernels loaded from {module.__file__} (backend {_state['backend']!r})"


def backend() -> str:
    return _state["backend"]


def set_backend(name: str) -> None:
    """"auto": fast kernels where they apply, composed ops elsewhere; "fast": the same but
    an error if the kernels cannot be built; "composed": never the kernels."""
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _state["backend"] = name


@contextlib.contextmanager
def use_backend(name: str):
    previous = _state["backend"]
    set_backend(name)
    try:
        yield
    finally:
        _state["backend"] = previous


@contextlib.contextmanager
def record_dispatch():
    """Collect ``(operation, path, reason)`` for every normalization call in the block."""
    log: list = []
    _logs.append(log)
    try:
        yield log
    finally:
        _logs.remove(log)


def note(operation: str, path: str, reason: str = "") -> None:
    for log in _logs:
        log.append((operation, path, reason))
