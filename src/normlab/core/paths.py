"""The path rule: the one place that decides how a normalization call runs.

Every call of a norm family — :func:`normlab.core.channel.channel_norm` (BatchNorm,
InstanceNorm, GroupNorm, masked or not, with an activation, in place) and
:func:`normlab.core.row.row_norm` (LayerNorm, RMSNorm, LayerNorm2d, residual add) — asks
:func:`choose_path` once and does what it answers. Nothing else chooses: not a module, not
a functional, not the C++ kernels (which check what they need and refuse, never pick).

The answer is a :class:`Decision` ``(path, how, reason)``:

=========== ========================================================================
path        what runs
=========== ========================================================================
kernels     normlab's compiled kernels (:mod:`normlab.core.kernels.cpu`): float32 CPU
triton      normlab's Triton kernels (:mod:`normlab.core.kernels.triton`): CUDA tensors,
            or CPU tensors under Triton's interpreter when the backend is forced;
            float32, float16, bfloat16; fused activation, masks, in place, add + norm
native      torch's own norm ops: what exporters, ``torch.func``, tensor subclasses
            and other dtypes and devices get (:mod:`normlab.core.native`)
composed    normlab's composed torch ops (:mod:`normlab.core.composed`): any dtype and
            device, normlab's accuracy; the masks' path where neither the masked CPU kernels nor
            the Triton kernels run
=========== ========================================================================

``how`` says how the path runs: kernels ``"direct"`` (the family's eager C++ entry, one
crossing, a C++ autograd node), ``"masked"`` (the masked kernels' eager C++ entry, the same one
crossing with a mask, :mod:`normlab.core.kernels.cpu.masked`), ``"operator"`` (``torch.ops.normlab.*`` on real tensors,
which a mode must see) or ``"traced"`` (the operators inside torch.compile, on fake
tensors: the running estimates are updated with torch ops there); triton ``"eager"`` or
``"traced"`` (its ``torch.ops.normlab.triton_*`` operators either way); native ``"export"``
(the ops exporters know, e.g. ONNX InstanceNormalization) or ``"eager"``; composed
``"eager"`` (closed-form autograd Functions), ``"reference"`` (plain differentiable ops, for
export and ``torch.func``), ``"pointwise"`` (a compiled BatchNorm with given statistics, as
ops the compiler fuses) or ``"decomposed"`` (a compiled norm with batch statistics as plain
differentiable ops on shifted moments, :mod:`normlab.core.decomposed`, which the compiler fuses
with the activation, the running update and the ops around it).

The table, first matching row wins:

==  ============================================================  ======================
#   condition                                                     path, how
==  ============================================================  ======================
1   eager plain float32 CPU tensor, kernels built, backend auto   kernels, direct
    or kernels, no tracer, mode, transform or forward AD, not
    empty, no mask; in place only in a layout the kernels read;
    RMSNorm only contiguous
2   backend auto on a CUDA tensor, or forced to "triton"; no      triton, eager (traced
    export, jit.trace, torch.func, forward AD, tensor subclass    in a compile)
    outside a compile or empty input; not (auto) a compiled
    BatchNorm with given statistics; (auto) a call torch.nn has
    no single kernel for — fused activation, in place, mask,
    residual add, BatchNorm training with running estimates;
    the Triton kernels take the call (their ``takes``: dtype,
    activation, layouts, sizes)
3   a mask: eager plain float32 CPU channel norm in a layout the  kernels, masked
    kernels read, a bool CPU mask; as row 1 otherwise (and
    asked with it: neither row can match a call row 2 takes)
4   a mask, otherwise                                             composed, eager (or
                                                                  reference under
                                                                  export / torch.func)
5   torch.export, ONNX export, jit.trace                          native, export
6   a torch.func transform or forward-mode AD                     native, eager
7   backend forced to "composed", not a tensor subclass, a        composed, eager
    complex input (RMSNorm's, which torch's op takes) or empty
    (torch's op decides what an empty input means: torch 2.14
    refuses a GroupNorm with no channels or positions)
8   a tensor subclass (DTensor, ...), outside a compile, any      native, eager
    backend: the composed ops write in place, which a sharded
    DTensor refuses; its sharding rules are torch's ops
9   empty input                                                   native, eager
10  backend forced to "native", or to "triton" (row 2 refused)    native, eager
10b closed_form (EvoNorm-B0/S0, SwitchableNorm), any dtype       composed, eager; compiling: native
11  float32 CPU: kernels unavailable                              composed, eager
12  float32 CPU: LayerNorm2d on a layout that is not rows of C    composed, eager
13  float32 CPU: in place on a layout the kernels do not read     composed, eager
14  float32 CPU: RMSNorm on a non-contiguous input                native, eager
15  float32 CPU: compiling BatchNorm with given statistics        composed, pointwise
16  float32 CPU: compiling BatchNorm with batch statistics        composed, decomposed
    (contiguous, not in place), or GroupNorm, InstanceNorm,
    LayerNorm, RMSNorm
    with no gradient recorded (``torch.no_grad``)
17  float32 CPU: otherwise: a compile, or a mode                  kernels, traced or
                                                                  operator
18  anything else (float64, half, CUDA, meta, ...)                native, eager
==  ============================================================  ======================

and in place runs native only under export or a torch.func transform (torch's ops, the
output then copied over the input); otherwise a native answer becomes composed, eager
(torch has no in-place norm). Export and transforms take rows 5 and 6 whatever the forced
backend: the composed ops' closed-form autograd Functions are opaque to them. A forced backend that cannot take a call falls to the next one this way:
kernels → native → composed ("kernels" on float64 runs native; "native" with a mask or in
place runs composed), triton → native → composed (the reason names what the Triton kernels
refused); the reason says so. Forcing "kernels" where they cannot be built is an error, and
so is forcing "triton" where its kernels cannot run: without the ``triton`` package, with
neither CUDA nor the interpreter, or on a CPU tensor when ``TRITON_INTERPRET=1`` was not set
before the kernels were first imported (triton reads it once per process).

Backends (:func:`set_backend`, :func:`use_backend`, ``NORMLAB_BACKEND``) and
:func:`record_dispatch` are documented where they are defined. The Triton kernels are imported
the first time the rule asks about a CUDA tensor or the backend is forced to "triton" (a
CPU-only program never imports ``triton``); :func:`register_gpu_kernels` registers their adapter.

Row 1 is the common call, written to be cheap: one Python call besides this function
(``torch.compiler.is_dynamo_compiling``), attribute reads, and one C call that reads the
tensor's dtype, device and dispatch keys and the dispatcher's thread-local state (jit
tracer, torch.func, modes) at once — the kernels module's ``plain_eager``, which answers the
rule's question and decides nothing (asked one by one from Python, the same questions cost
as much as a small tensor's kernel). Row 3, a masked call the kernels take, is asked in the
same test: it differs from row 1 only in the mask's dtype and device and the layout. The
other rows are evaluated only when it does not match.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.autograd.forward_ad as _forward_ad

from .kernels.cpu import build as _cpu
from .recompute import checkpoint_recompute_on_stack

if TYPE_CHECKING:
    from .kernels import KernelBackend

    _Record = tuple[str, str, str]  # what record_dispatch collects per call: (operation, path, reason)

__all__ = [
    "BACKENDS",
    "CHANNEL",
    "CHANNELS_FIRST",
    "CLOSED_FORM",
    "Decision",
    "ROW",
    "backend",
    "choose_path",
    "computes_in_place",
    "kernel_layout",
    "recomputing",
    "record_dispatch",
    "register_gpu_kernels",
    "set_backend",
    "status",
    "use_backend",
]

KERNELS, NATIVE, COMPOSED, TRITON = "kernels", "native", "composed", "triton"
#: The families, as choose_path's ``family``: channel norms; row norms over the trailing dims;
#: rows over dim 1 of an (N, C, H, W) tensor (LayerNorm2d); norms whose fast route on any dtype and
#: device is a closed-form autograd Function of torch ops (EvoNorm-B0 and -S0, SwitchableNorm).
CHANNEL, ROW, CHANNELS_FIRST, CLOSED_FORM = "channel", "row", "channels_first", "closed_form"
BACKENDS = ("auto", KERNELS, TRITON, NATIVE, COMPOSED)
_ALIASES = {"fast": KERNELS}


class Decision(NamedTuple):
    """A call's path, how it runs there, and why (empty for the common case).

    Attributes:
        path: "kernels", "triton", "native" or "composed".
        how: how it runs there ("direct", "masked", ...), or "".
        reason: why this path and not the usual one, or "".
    """

    path: str
    how: str
    reason: str


#: Row 1's answer: one object, so that the entries test it with ``is``.
KERNELS_DIRECT = Decision(KERNELS, "direct", "")
#: Row 2's answer for a mask the kernels take.
KERNELS_MASKED = Decision(KERNELS, "masked", "mask: the masked kernels")


def _checked_backend(name: str) -> str:
    name = _ALIASES.get(name, name)
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (or 'fast', the old name of 'kernels'), got {name!r}")
    return name


def _initial_backend() -> str:
    name = os.environ.get("NORMLAB_BACKEND", "auto")
    try:
        return _checked_backend(name)
    except ValueError:
        warnings.warn(f"NORMLAB_BACKEND={name!r} is not one of {BACKENDS}; using 'auto'", stacklevel=2)
        return "auto"


_backend = [_initial_backend()]  # a list: read on every call without a global statement
_logs: list[list[_Record]] = []
# the GPU kernels' adapter: loaded by _gpu_ready, or set by register_gpu_kernels
_gpu_kernels: list[KernelBackend | None] = [None]
_gpu_loaded = [False]  # whether _gpu_ready tried (or register_gpu_kernels set them)
_gpu_missing = [""]  # why they could not be loaded


def _constant_to_compile(fn: Callable[..., bool]) -> Callable[..., bool]:
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo (about 1 s)
    where nothing compiles: a mark dynamo reads when it traces (tests/core checks it)."""
    if "torch._dynamo" in sys.modules:
        marked: Callable[..., bool] = torch.compiler.assume_constant_result(fn)  # type: ignore[no-untyped-call]  # unannotated in torch
        return marked
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


_is_dynamo_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
_tracing_state = torch._C._get_tracing_state  # not None inside torch.jit.trace
_interpreters = torch._C._functorch.peek_interpreter_stack  # not None inside a torch.func transform
_function_modes = torch._C._is_torch_function_mode_enabled
_graph_task_id = torch._C._current_graph_task_id  # -1 outside a backward pass
_dispatch_modes = torch._C._len_torch_dispatch_stack
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_F32 = torch.float32


def backend() -> str:
    """The backend set by :func:`set_backend` / ``NORMLAB_BACKEND`` ("auto" by default)."""
    return _backend[0]


def set_backend(name: str) -> None:
    """ "auto": the table; "kernels" (or "fast"): the kernels wherever they can take a call
    (an error if they cannot be built); "native": torch's ops wherever normlab's semantics
    allow; "composed": normlab's composed ops everywhere. Where a forced backend cannot take a
    call, the next one does (kernels → native → composed).

    Args:
        name: "auto", "kernels" (or "fast"), "native", "composed" or "triton".

    Raises:
        ValueError: another name.
    """
    _backend[0] = _checked_backend(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """:func:`set_backend` for the duration of a ``with`` block.

    Args:
        name: as for :func:`set_backend`.
    """
    previous = _backend[0]
    set_backend(name)
    try:
        yield
    finally:
        _backend[0] = previous


def status() -> str:
    """The backend and the kernels' state, in one line (for logs and benchmark records)."""
    if _backend[0] == COMPOSED:
        return "backend 'composed': the kernels are not used"
    if _backend[0] == TRITON:
        from .kernels import triton as triton_kernels

        return f"backend 'triton'; {triton_kernels.status()}"
    return f"backend {_backend[0]!r}; {_cpu.status()}"


@contextlib.contextmanager
def record_dispatch() -> Iterator[list[_Record]]:
    """Collect ``(operation, path, reason)`` for every normalization call decided in the block:
    eager calls, and the calls of a graph that ``torch.compile`` traces in it (once, at the
    trace: the compiled graph neither asks again nor records)."""
    log: list[_Record] = []
    _logs.append(log)
    try:
        yield log
    finally:
        _logs.remove(log)


def _note(operation: str, decision: Decision) -> None:
    for log in _logs:
        log.append((operation, decision.path, decision.reason))


@_constant_to_compile
def _note_traced(operation: str, path: str, how: str, reason: str) -> bool:
    # Called by the compiler while it traces, not compiled: a record_dispatch block around the
    # call that compiles sees the decisions, and the graph neither guards on nor records them
    if _logs:
        _note(operation, Decision(path, how, reason))
    return True


def register_gpu_kernels(kernels: KernelBackend | None) -> None:
    """Plug in the GPU kernels (the rule loads the Triton kernels' adapter,
    :data:`normlab.core.kernels.triton.backend.BACKEND`, by itself): an object whose
    ``unavailable(x)`` says why its kernels cannot run on x's device here ("" where they
    can), whose ``takes(x, family, call, given=, mask=, inplace=, centered=)`` answers
    ``(True, "")`` or ``(False, why)`` for a call (row 2; ``call`` is what the family entry
    passes: see :mod:`normlab.core.kernels`), and whose ``channel_norm`` / ``row_norm`` the
    families' entries then call. None unregisters them: the rule loads the Triton kernels'
    adapter again at its next question about a CUDA tensor or a forced "triton"."""
    _gpu_kernels[0] = kernels
    _gpu_loaded[0] = kernels is not None


@_constant_to_compile
def _gpu_ready() -> bool:
    # A constant to torch.compile: the import (triton, its kernels' definitions) never runs in
    # a trace. Tried once per process, as triton reads TRITON_INTERPRET once.
    if not _gpu_loaded[0]:
        _gpu_loaded[0] = True
        from .kernels import triton as triton_kernels

        if not triton_kernels.available():
            _gpu_missing[0] = triton_kernels.status()
            if "TRITON_INTERPRET" in _gpu_missing[0]:
                _gpu_missing[0] += (
                    "; triton reads TRITON_INTERPRET once per process, when its kernels are first "
                    "defined: set it in the environment before Python starts"
                )
        else:
            try:
                from .kernels.triton.backend import BACKEND
            except Exception as error:  # noqa: BLE001 (a broken triton install: say what it raised)
                _gpu_missing[0] = f"the Triton kernels failed to import: {type(error).__name__}: {error}"
            else:
                _gpu_kernels[0] = BACKEND
    return _gpu_kernels[0] is not None


def _triton_refusal(
    x: torch.Tensor,
    family: str,
    call: tuple[object, ...],
    given: bool,
    mask: torch.Tensor | None,
    inplace: bool,
    centered: bool,
    forced: str,
    compiling: bool,
    exporting: bool,
    transformed: bool,
) -> str | None:
    """None where the Triton kernels run this call (row 2); otherwise why not — "" where a
    later row of the table says it (export, torch.func, a subclass, an empty input). A forced
    "triton" that cannot run on x's device at all is an error."""
    # (the closed-form family has no Triton kernels: row 10b says it, or 10 when forced)
    if exporting or transformed or (not compiling and type(x) not in _PLAIN) or x.numel() == 0 or family == CLOSED_FORM:
        return ""
    if _gpu_kernels[0] is None and not _gpu_ready():
        if forced == TRITON:
            raise RuntimeError(f"backend 'triton' was forced but {_gpu_missing[0]}")
        return _gpu_missing[0]
    gpu = _gpu_kernels[0]
    if TYPE_CHECKING:  # _gpu_ready answers True only with the kernels' adapter set
        assert gpu is not None
    why = gpu.unavailable(x)
    if why:
        if forced == TRITON:
            raise RuntimeError(f"backend 'triton' was forced but {why}")
        return why
    if forced != TRITON and compiling and given and family == CHANNEL and mask is None:
        # as row 15: torch's eval BatchNorm compiles to pointwise ops fused with their neighbours
        return "compiling with given statistics: torch's ops, which the compiler fuses"
    if forced != TRITON and call and not _torch_lacks(family, call, given, mask, inplace):
        # Under "auto", plain norms stay on torch's CUDA kernels: the Triton ones are routed
        # only for what torch.nn has no single kernel for, until a GPU measures them faster
        return _PLAIN_ON_TORCH
    ok, why = gpu.takes(x, family, call, given=given, mask=mask, inplace=inplace, centered=centered)
    return None if ok else why


_PLAIN_ON_TORCH = "a plain norm, which torch's CUDA kernel runs (auto routes what torch.nn lacks)"


def _torch_lacks(
    family: str,
    call: tuple[Any, ...],  # the family's arguments as the caller gave them: unchecked
    given: bool,
    mask: torch.Tensor | None,
    inplace: bool,
) -> bool:
    """Whether a call is one torch.nn has no single CUDA kernel for: a fused activation, the
    in-place mode, a mask, a residual add, or a BatchNorm training step whose running
    estimates take normlab's conventions (torch's kernel then needs separate update ops,
    the Triton kernel updates them inside its one launch)."""
    if mask is not None or inplace:
        return True
    if family == CHANNEL:
        _, _, running, groups, activation, _ = call
        if activation != "identity":
            return True
        return groups == -1 and not given and running is not None and running.buffers.get("running_mean") is not None
    if family == ROW:
        return call[2] is not None  # the residual
    return False


def _decomposes(x: torch.Tensor, family: str, given: bool, call: tuple[object, ...]) -> bool:
    """Row 16: a compiled float32 CPU call that runs faster as the decomposition
    (:mod:`normlab.core.decomposed`) than as the kernels' operator, measured on whole models
    (docs/performance.md, "Compiled models"): BatchNorm with batch statistics on a contiguous
    input (training, with or without a fused activation; channels_last keeps the operator,
    which measured faster there), and GroupNorm, InstanceNorm, LayerNorm and RMSNorm where no
    gradient is recorded (eval under ``torch.no_grad``). GroupNorm training stays on the
    operator, which is faster there. A compiled in-place call comes out of place (:func:`computes_in_place`)."""
    if not call:
        return False
    if family == CHANNEL:  # call[3]: the groups, -1 for BatchNorm
        if given:
            return False
        if call[3] == -1:  # channels_last training measured slower decomposed (0.97 vs 0.92)
            return x.is_contiguous()
        return not torch.is_grad_enabled()
    return family == ROW and not torch.is_grad_enabled()


def computes_in_place() -> bool:
    """Whether an in-place call (``inplace=True``) runs in place, keeping only its output: in
    eager mode. A compiled one takes the out-of-place route (the fused operator or the
    decomposition, no graph break) and returns a new output, its input left as it is (as in
    eval mode): the same values and gradients without the memory saving, which is eager's.
    Not written over the input: a compiled graph that mutates an input autograd saved fails
    to compile or, where the decomposition saved it, gives wrong gradients."""
    return not _is_dynamo_compiling()


def recomputing() -> bool:
    """True for activation checkpointing's recompute, whose batch the running estimates have
    counted already (:mod:`normlab.core.recompute`); a compiled graph never recomputes one."""
    return not _is_dynamo_compiling() and _graph_task_id() != -1 and checkpoint_recompute_on_stack()


@_constant_to_compile
def _kernels_built() -> bool:
    # A constant to torch.compile: the build (file locks, subprocesses) never runs in a trace.
    return _cpu.load() is not None


def kernel_layout(x: torch.Tensor) -> bool:
    """A layout the channel kernels read in place: NCHW-contiguous, channels_last, (N, C)."""
    if x.is_contiguous():
        return True
    return (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or (
        x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
    )


def choose_path(
    x: object,
    family: str = CHANNEL,
    operation: str = "norm",
    *,
    given: bool = False,
    mask: torch.Tensor | None = None,
    inplace: bool = False,
    centered: bool = True,
    call: tuple[object, ...] = (),
) -> Decision:
    """The path of a call of ``family`` on ``x`` (see the module's table), recorded for
    :func:`record_dispatch` under ``operation``.

    ``given``: normalize with given (running) statistics; ``mask``: valid positions;
    ``inplace``: the output overwrites the input; ``centered``: LayerNorm (False: RMSNorm);
    ``call``: the rest of the call, for the GPU kernels' question (channel: ``(weight, bias,
    running, groups, activation, prelu_weight)``; row: ``(normalized_shape, weight,
    residual)``).

    Args:
        x: the input: a tensor (anything else is answered "composed", whose checks report it).
        family: "channel" (BatchNorm, InstanceNorm, GroupNorm) or "row" (LayerNorm,
            RMSNorm). Default "channel".
        operation: the name recorded. Default "norm".
        given: keyword-only; see above. Default False.
        mask: keyword-only; see above. Default None.
        inplace: keyword-only; see above. Default False.
        centered: keyword-only; see above. Default True.
        call: keyword-only; see above. Default ().

    Returns:
        The :class:`Decision`.
    """
    compiling = _is_dynamo_compiling()
    forced = _backend[0]
    # 1 (and 3, a mask the kernels take). The common call, first and cheap (the kernels are
    # loaded at the first such call).
    if (
        not compiling
        and type(x) is torch.Tensor
        # a bool CPU mask (the entry checks its shape; the kernels read one bool per position)
        and (
            mask is None
            or (family == CHANNEL and type(mask) is torch.Tensor and mask.dtype is torch.bool and mask.is_cpu)
        )
        and (forced == "auto" or forced == KERNELS)
        # the module read once (a local, which the checker sees is not None; load() sets it)
        and ((kernels := _cpu.module) is not None or (kernels := _cpu.load()) is not None)
        and _forward_ad._current_level < 0
        # a plain float32 CPU tensor with values; no jit.trace, torch.func transform or mode:
        # asked of the kernels' module in one C call (see its plain_eager), the rest is here
        and kernels.plain_eager(x)
        and (
            (family == CHANNEL and ((not inplace and mask is None) or x.is_contiguous() or kernel_layout(x)))
            or (family == ROW and (centered or x.is_contiguous()))
        )
    ):
        decision = KERNELS_DIRECT if mask is None else KERNELS_MASKED
        if _logs:
            _note(operation, decision)
        return decision
    exporting = torch.compiler.is_exporting() or _tracing_state() is not None
    transformed = not compiling and (_interpreters() is not None or _forward_ad._current_level >= 0)
    refused: str | None = ""  # why the Triton kernels do not run a call that row 2 asked them about
    if not isinstance(x, torch.Tensor):  # the entry's checks report it
        decision = Decision(COMPOSED, "eager", f"not a tensor: {type(x).__name__}")
    elif (forced == TRITON or (forced == "auto" and x.is_cuda)) and (
        refused := _triton_refusal(
            x, family, call, given, mask, inplace, centered, forced, compiling, exporting, transformed
        )
    ) is None:
        decision = Decision(TRITON, "traced" if compiling else "eager", "")  # 2
    elif mask is not None:  # 4 (3, the masked kernels, was asked with row 1)
        if exporting or transformed:
            decision = Decision(COMPOSED, "reference", "mask: differentiable ops")
        else:
            decision = Decision(COMPOSED, "eager", "mask: closed-form backward")
    elif exporting:  # 5
        decision = Decision(NATIVE, "export", "export/trace: torch's own norm ops")
    elif transformed:  # 6
        decision = Decision(NATIVE, "eager", "torch.func transform or forward AD")
    elif forced == COMPOSED and (compiling or type(x) in _PLAIN) and not x.is_complex() and x.numel():  # 7
        decision = Decision(COMPOSED, "eager", "backend forced to 'composed'")
    elif not compiling and type(x) not in _PLAIN:  # 8
        decision = Decision(
            NATIVE, "eager", f"a tensor subclass ({type(x).__name__}): torch's ops, which it implements"
        )
    elif x.numel() == 0:  # 9
        decision = Decision(NATIVE, "eager", "empty input")
    elif forced == NATIVE:  # 10
        decision = Decision(NATIVE, "eager", "backend forced to 'native'")
    elif forced == TRITON:  # 10: what the Triton kernels do not take
        decision = Decision(NATIVE, "eager", f"backend 'triton' cannot take the call: {refused}; native")
        refused = ""
    elif family == CLOSED_FORM:  # 10b; compiled, plain ops the compiler fuses and differentiates
        decision = Decision(NATIVE, "eager", "compiling: plain ops") if compiling else Decision(COMPOSED, "eager", "")
    elif x.dtype is _F32 and x.is_cpu:
        if not (_kernels_built() if compiling else _cpu.load() is not None):  # 11
            if forced == KERNELS:
                raise RuntimeError(f"backend 'kernels' was forced but the kernels are unavailable: {_cpu.status()}")
            decision = Decision(COMPOSED, "eager", "kernels unavailable")
        elif family == CHANNELS_FIRST:  # 12
            decision = Decision(
                COMPOSED, "eager", "LayerNorm2d on a layout that is not rows of C: statistics over dim 1"
            )
        elif inplace and not kernel_layout(x):  # 13
            # the kernels would need a contiguous copy, and writing the output there would
            # leave the input untouched: the composed ops overwrite any strides
            decision = Decision(COMPOSED, "eager", "in place on a layout the kernels do not read")
        elif family == ROW and not centered and not x.is_contiguous():  # 14
            # RMSNorm subtracts no mean, so torch's op loses no accuracy here, and it keeps the
            # input's layout (channels_last stays channels_last) as torch.nn's RMSNorm does
            decision = Decision(NATIVE, "eager", "RMSNorm on a non-contiguous input")
        elif compiling and given and family == CHANNEL:  # 15
            # an opaque operator would stop the compiler fusing the normalization into the ops
            # around it, which torch.nn's eval BatchNorm (pointwise ops once compiled) gets
            decision = Decision(
                COMPOSED, "pointwise", "compiling with given statistics: pointwise ops the compiler fuses"
            )
        elif compiling and _decomposes(x, family, given, call):  # 16
            # the same: an opaque operator would keep the activation, the running update (and,
            # in eval, the ops around a per-sample norm) out of the compiler's fused kernels
            decision = Decision(COMPOSED, "decomposed", "compiling: shifted moments in ops the compiler fuses")
        elif compiling:  # 17
            decision = Decision(KERNELS, "traced", "torch.compile: the registered operator")
        else:
            decision = Decision(KERNELS, "operator", "a mode sees the registered operator")
    elif forced == KERNELS:  # 18, with the kernels forced
        decision = Decision(NATIVE, "eager", f"backend 'kernels' cannot take {x.dtype} on {x.device.type}: native")
    else:  # 18
        decision = Decision(NATIVE, "eager", "not float32 CPU")
    if refused:
        decision = Decision(decision.path, decision.how, f"{decision.reason} (Triton kernels: {refused})")
    if inplace and decision.path == NATIVE:
        if exporting or transformed:
            # what they see of an in-place layer: torch's ops, the output then copied over the
            # input (an autograd.Function that overwrites its input is opaque to them)
            decision = Decision(NATIVE, decision.how, f"{decision.reason}; in place: the output copied over the input")
        else:
            decision = Decision(COMPOSED, "eager", f"{decision.reason}; in place: torch has no in-place norm")
    if compiling:
        _note_traced(operation, *decision)
    elif _logs:
        _note(operation, decision)
    return decision
