"""Build (on first use) and load the C++ kernels.

The kernels are compiled once per torch installation by ``torch.utils.cpp_extension``
(about 20 s, needs a C++ compiler and the ``ninja`` package; a one-line message on stderr
says so) and cached under ``~/.cache/torch_extensions`` (``NORMLAB_BUILD_DIR`` or
``TORCH_EXTENSIONS_DIR`` to choose another place). If anything about that fails, normlab
says so once and the path rule (:mod:`normlab.core.paths`) sends float32 CPU calls to the
composed torch ops — the same results, slower.

    normlab.core.kernels.cpu.status()     # "kernels loaded from ...", or why not
    normlab.core.set_backend("composed")  # force a path: see normlab.core.paths
    with normlab.core.record_dispatch() as log: model(x)   # which path each call took

``NORMLAB_BACKEND=composed`` in the environment never builds anything: the path rule never
asks for the kernels then.

How the cache stays safe:

- The cache entry is named by everything the compiled module depends on: the kernel sources,
  the compiler flags, this CPU (``-march=native``), and the torch installation (its
  directory, version, git revision and CUDA/ROCm/CPU variant) and Python version. Two
  virtual environments therefore never share, or rebuild, each other's kernels.
- Builders take an ``flock`` on the entry's ``normlab.lock``. The OS drops it when the holder
  exits however it exits (SIGKILL included), so a killed builder never leaves a lock that
  others wait on; a live holder is waited for at most ``NORMLAB_BUILD_TIMEOUT`` seconds
  (default 300), after which the waiter uses the composed ops and says why.
- Each build runs in a private directory, so torch's own lock file there is never
  contended, and the finished library is moved into place atomically: a reader sees no
  library or a complete one. Directories left by killed builders are removed later.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol, TypedDict, cast

from ...activation import ACTIVATIONS

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch

    from ...running import RunningStats

__all__ = ["BUILD_MESSAGE", "available", "build_name", "build_root", "installation", "load", "module", "status"]

# The two translation units the compiler sees (each includes the files of several concerns:
# see unit_kernels.cpp), and every C++ file of this folder, which the cache key hashes.
_HERE = Path(__file__).parent
_SOURCES = (_HERE / "unit_kernels.cpp", _HERE / "unit_python.cpp")
_HEADERS = tuple(
    path for path in sorted(_HERE.glob("*.[ch]*")) if path.suffix in (".cpp", ".h") and path not in _SOURCES
)
# -fopenmp: at::parallel_for's OpenMP branch is inline in ATen's headers, so without it the
# kernels would run on one thread. libgomp.so.1 resolves to the copy torch has already
# loaded, so there is one thread pool, sized by torch.set_num_threads. No -ffast-math: NaN
# and inf behave exactly as IEEE says. No -std=...: torch passes the C++ standard its own
# headers need (C++20 for torch 2.14's); kernels.cpp compiles as C++17 and as C++20.
_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno")
_LDFLAGS = ("-fopenmp",)
_LIB_SUFFIX = ".pyd" if sys.platform == "win32" else ".so"
_DEFAULT_TIMEOUT_S = 300.0
BUILD_MESSAGE = "normlab: building the CPU kernels (first use, about 20 s)..."


class KernelsModule(Protocol):
    """What the compiled module (``entries.cpp``'s ``PYBIND11_MODULE``) offers Python, as its
    C++ signatures declare it; pybind11 takes the arguments by position. Where a call's
    arguments do not fit, ``channel_norm``, ``masked_channel_norm`` and ``row_norm`` return None and
    write nothing."""

    #: the activation codes the kernels switch on, by normlab's names
    activation_codes: dict[str, int]

    def plain_eager(self, x: torch.Tensor, /) -> bool: ...

    def channel_norm(
        self,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running: RunningStats | None,
        groups: int,
        batch_stats: bool,
        eps: float,
        act: int,
        param: float,
        prelu: torch.Tensor | None,
        /,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
        """y; ``(y, mean, var, count)`` where the running update is left to the policy; None."""

    def row_norm(
        self,
        input: torch.Tensor,
        shape: Sequence[int],
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        centered: bool,
        residual: torch.Tensor | None,
        /,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """y; ``(y, x + residual)`` with a residual; None."""

    def update_running(self, policy: RunningStats, mean: torch.Tensor, var: torch.Tensor, count: int, /) -> bool: ...

    def kept_channels(
        self,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        channels: int,
        four_eps: float,
        tolerance: float,
        guard: float,
        /,
    ) -> torch.Tensor | None:
        """The in-place mode's kept channels where its activation's inverse loses nothing
        (``unrecoverable_channels`` but ELU's test); None where there are none."""

    def masked_channel_norm(
        self,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mask: torch.Tensor,
        running: RunningStats | None,
        groups: int,
        batch_stats: bool,
        eps: float,
        act: int,
        param: float,
        prelu: torch.Tensor | None,
        /,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """y; ``(y, mean, var, count)`` where the running update is left to Python; None."""

    #: the operators' bodies: their arguments are the operators' schemas (operators.py) and then
    #: the eager-only flags; tests/kernels/test_build.py checks each binding against its schema
    channel_forward: Callable[..., list[torch.Tensor]]
    channel_backward: Callable[..., list[torch.Tensor]]
    masked_channel_backward: Callable[..., list[torch.Tensor]]
    row_forward: Callable[..., list[torch.Tensor]]
    row_backward: Callable[..., list[torch.Tensor]]
    add_row_forward: Callable[..., list[torch.Tensor]]
    add_row_backward: Callable[..., list[torch.Tensor]]


class _BuildState(TypedDict):
    path: Path | None  # the library loaded
    error: str | None  # why it could not be, in one line
    tried: bool


#: The loaded extension module, or None (not built yet, or unavailable: see ``_state``). The
#: path rule reads it on every call: a module attribute, no function call.
module: KernelsModule | None = None
_state: _BuildState = {"path": None, "error": None, "tried": False}
_lock = threading.Lock()


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


def installation() -> dict[str, str]:
    """Everything a compiled kernel module is tied to (the fields of its cache key)."""
    import torch

    if torch.version.cuda:
        variant = f"cuda{torch.version.cuda}"
    elif getattr(torch.version, "hip", None):
        variant = f"rocm{torch.version.hip}"
    else:
        variant = "cpu"
    return {
        "torch_dir": str(Path(torch.__file__).resolve().parent),
        "torch_version": torch.__version__,
        "torch_git": str(getattr(torch.version, "git_version", "")),
        "variant": variant,
        "python": f"{sys.implementation.name}{sys.version_info.major}.{sys.version_info.minor}{getattr(sys, 'abiflags', '')}",
        "cpu": _cpu_signature(),
        "source": hashlib.sha1(b"".join(path.read_bytes() for path in _SOURCES + _HEADERS)).hexdigest(),
        "flags": " ".join(_CFLAGS + ("|",) + _LDFLAGS),
    }


def build_name(fields: Mapping[str, str]) -> str:
    """The cache entry's name: readable torch and Python versions, then a hash of every field.

    It is also the Python module name, so it must be an identifier."""
    digest = hashlib.sha1(repr(sorted(fields.items())).encode()).hexdigest()[:12]
    python = "py" + fields["python"].split("python")[-1].replace(".", "")
    readable = re.sub(r"\W", "_", f"torch{fields['torch_version']}_{python}")
    return f"normlab_kernels_{readable}_{digest}"


def build_root() -> Path:
    """Where cache entries live: NORMLAB_BUILD_DIR, else TORCH_EXTENSIONS_DIR, else the
    user's cache directory."""
    for variable in ("NORMLAB_BUILD_DIR", "TORCH_EXTENSIONS_DIR"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"


def _timeout() -> float:
    text = os.environ.get("NORMLAB_BUILD_TIMEOUT", "")
    if not text:
        return _DEFAULT_TIMEOUT_S
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"NORMLAB_BUILD_TIMEOUT must be a number of seconds, got {text!r}") from None


def _import(name: str, path: Path) -> KernelsModule:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # not a file Python can load as an extension
        raise ImportError(f"{path} cannot be loaded as a Python extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return cast(KernelsModule, module)


def _acquire(lock_path: Path, timeout: float) -> IO[str] | None:
    """An open file holding an exclusive flock on ``lock_path``, or None where this system
    or file system has no flock (building unlocked is still safe, only perhaps duplicated).
    Raises TimeoutError if another process holds the lock for ``timeout`` seconds."""
    try:
        import fcntl
    except ImportError:
        return None
    handle = open(lock_path, "a+")  # noqa: SIM115 — held until the build is done
    deadline = time.monotonic() + timeout
    waiting_said = False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            pass
        except OSError:  # e.g. a network mount without locks
            handle.close()
            return None
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        if time.monotonic() > deadline:
            handle.close()
            raise TimeoutError(
                f"another process (pid {holder}) has held {lock_path} for over {timeout:.0f} s while "
                f"building the kernels; set NORMLAB_BUILD_TIMEOUT to wait longer, or NORMLAB_BUILD_DIR "
                f"to build elsewhere"
            )
        if not waiting_said:
            print(
                f"normlab: waiting for another process (pid {holder}) that is building the CPU kernels...",
                file=sys.stderr,
                flush=True,
            )
            waiting_said = True
        time.sleep(0.1)
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def _remove_abandoned_builds(entry: Path) -> None:
    """Private build directories of builders that died (their pid is gone from this host),
    or older than a day. Called only while holding the entry's lock."""
    host = socket.gethostname()
    for work in entry.glob("tmp-*"):
        parts = work.name.split("-")  # tmp-<host>-<pid>-<random>
        pid = int(parts[-2]) if len(parts) >= 4 and parts[-2].isdigit() else None
        same_host = "-".join(parts[1:-2]) == host
        alive = True
        if same_host and pid is not None:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive = False
            except PermissionError:
                pass
        try:
            old = time.time() - work.stat().st_mtime > 86400
        except OSError:
            continue
        if not alive or old:
            shutil.rmtree(work, ignore_errors=True)


def _compile(name: str, entry: Path) -> KernelsModule:
    from torch.utils import cpp_extension

    try:  # cpp_extension runs `ninja`; the pip package puts it beside the interpreter
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    print(BUILD_MESSAGE, file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(prefix=f"tmp-{socket.gethostname()}-{os.getpid()}-", dir=entry))
    try:
        module = cpp_extension.load(
            name=name,
            sources=[str(path) for path in _SOURCES],
            extra_cflags=list(_CFLAGS),
            extra_ldflags=list(_LDFLAGS),
            build_directory=str(work),
            verbose=False,
        )
        os.replace(work / f"{name}{_LIB_SUFFIX}", entry / f"{name}{_LIB_SUFFIX}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cast(KernelsModule, module)


def _build() -> tuple[KernelsModule, Path]:
    """Load the cached module, building it first if needed. Returns (module, library path)."""
    name = build_name(installation())
    entry = build_root() / name
    library = entry / f"{name}{_LIB_SUFFIX}"
    if library.exists():
        with contextlib.suppress(ImportError):
            return _import(name, library), library
    entry.mkdir(parents=True, exist_ok=True)
    handle = _acquire(entry / "normlab.lock", _timeout())
    try:
        if library.exists():  # built by the process we waited for
            with contextlib.suppress(ImportError):
                return _import(name, library), library
        _remove_abandoned_builds(entry)
        log = entry / "build-error.log"
        try:
            module = _compile(name, entry)
        except Exception as err:
            with contextlib.suppress(OSError):
                log.write_text(f"{type(err).__name__}: {err}\n")
            raise
        log.unlink(missing_ok=True)
        return module, library
    finally:
        if handle is not None:
            handle.close()  # closing the file releases the flock


def _summary(err: Exception) -> str:
    """One line for the warning: the compiler's first error if there is one, else the last line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"\berror\b", line) and not line.startswith("Error building")]
    detail = errors[0] if errors else (lines[-1] if lines else "")
    return f"{type(err).__name__}: {detail}"


def load() -> KernelsModule | None:
    """The compiled module, building it on the first call; None when it cannot be built (the
    reason is in :func:`status`)."""
    global module
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                try:
                    built, path = _build()
                    _check_activation_codes(built)
                    module, _state["path"] = built, path
                except Exception as err:  # noqa: BLE001 — no compiler, no ninja, a read-only cache, a lock timeout, ...
                    _state["error"] = _summary(err)
                    warnings.warn(
                        f"normlab: the CPU kernels could not be built ({_state['error']}); "
                        f"using composed torch ops (same results, slower). "
                        f"normlab.core.kernels.cpu.status() has the details.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                _state["tried"] = True
    return module


def _check_activation_codes(module: KernelsModule) -> None:
    """Raise unless the compiled module switches on the codes the activation registry holds."""
    expected = {name: entry.code for name, entry in ACTIVATIONS.items() if entry.fused}
    found = dict(getattr(module, "activation_codes", {}))
    if found != expected:
        raise RuntimeError(
            f"the kernels' activation codes {found} differ from normlab.core.activation's {expected}; "
            f"kernels.cpp's enum Act and its activation_codes table must follow the registry"
        )


def available() -> bool:
    """Whether the kernels can be used here (builds them on the first call)."""
    return load() is not None


def status() -> str:
    """Where the kernels were loaded from, or why they are unavailable."""
    if load() is None:
        log = build_root() / build_name(installation()) / "build-error.log"
        where = f"; the full build output is in {log}" if log.exists() else ""
        return f"kernels unavailable ({_state['error']}): composed torch ops run instead{where}"
    return f"kernels loaded from {_state['path']}"
