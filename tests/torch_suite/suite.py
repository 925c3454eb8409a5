"""PyTorch's own test inputs for its norm layers, run through torch.nn and through normlab.

PyTorch ships the inputs its test suite feeds each module and functional:
``common_modules.module_db`` (constructor arguments and forward inputs per module, and
inputs that must raise) and ``common_methods_invocations.op_db`` (sample, reference and
error inputs per functional). This module turns each into a *case* with a stable id, runs
it through both libraries from identical state and returns the differences as text.

How a case is judged (normlab against torch.nn):

- Structure: output shape and dtype, output memory format (contiguous / channels_last /
  strided), which tensors receive gradients, the buffers' names.
- Values: output, the input's gradient, every parameter's gradient and every buffer after
  forward + backward. In float64, torch.nn's results are the truth and normlab must be
  within ``FLOAT64_ULPS`` ulps of them. In float32/float16/bfloat16 the truth is torch.nn
  run in float64 on the same values and state; normlab's largest error may exceed
  torch.nn's largest error by at most ``SLACK_ULPS`` ulps of the dtype (at the tensor's
  scale max(1, max |truth|)), so being more accurate than torch.nn never counts against
  normlab. Where the truth is NaN/inf normlab must be non-finite too; where the truth is
  finite normlab may be non-finite only where torch.nn is.
- The input is left unmodified; integer buffers (``num_batches_tracked``) are equal.
- Where torch.nn raises, normlab must raise an exception of the same class (a subclass
  counts), at construction or at the call; where torch.nn computes, normlab must compute.
  A dtype torch.nn's CPU kernels do not implement is skipped, not judged.

Module states are randomized (γ, β, running mean and variance, a batch counter of 2) —
PyTorch's own tests use the defaults, which hide mistakes such as a β applied twice.
"""

from __future__ import annotations

import functools
import inspect
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as TF
from torch import nn

import normlab as nl

#: normlab's largest error may exceed torch.nn's by this many ulps of the dtype, at the
#: scale max(1, max |truth|) of the tensor compared (for the input gradient, at least the
#: size of the terms it is computed from). On torch 2.13 the largest excess over all cases
#: was 3.9 ulps (float32), 0.7 (float16/bfloat16).
SLACK_ULPS = 8
#: float64: normlab within this many float64 ulps (same scale) of torch.nn; largest seen 7.8.
FLOAT64_ULPS = 32

MODULE_NAMES = (
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "RMSNorm",
)
FUNCTIONAL_NAMES = ("batch_norm", "group_norm", "instance_norm", "layer_norm", "rms_norm")

#: module_db lists float16/bfloat16 for GroupNorm only; normlab promises half precision
#: for every layer, so every module runs in them too.
EXTRA_MODULE_DTYPES = (torch.float16, torch.bfloat16)
HALF_TYPES = (torch.float16, torch.bfloat16)

#: (what, dtype, excess in ulps) of every judged tensor; survey.py reports the spread.
MARGINS: list[tuple[str, torch.dtype, float]] = []

_SHORT = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.complex64: "c64",
    torch.complex128: "c128",
}


def dtype_name(dtype: torch.dtype) -> str:
    return _SHORT[dtype]


# --------------------------------------------------------------------------- databases


@functools.cache
def module_infos() -> dict[str, Any]:
    from torch.testing._internal.common_modules import module_db

    return {info.module_cls.__name__: info for info in module_db if info.module_cls.__name__ in MODULE_NAMES}


@functools.cache
def op_infos() -> dict[str, Any]:
    from torch.testing._internal.common_methods_invocations import op_db

    wanted = {f"nn.functional.{name}": name for name in FUNCTIONAL_NAMES}
    # batch_norm's second entry (variant "without_cudnn") has the same inputs.
    return {wanted[op.name]: op for op in op_db if op.name in wanted and not op.variant_test_name}


def implementation(impl: str):
    """(module namespace, functional namespace) of ``impl``: "torch" or "normlab"."""
    if impl == "torch":
        return nn, TF
    if impl == "normlab":
        return nl.nn, nl.functional
    raise ValueError(f"impl must be 'torch' or 'normlab', got {impl!r}")


# ---------------------------------------------------------------------------- layouts


def layouts_for(ndim: int) -> tuple[str, ...]:
    if ndim in (4, 5):
        return ("given", "channels_last", "noncontiguous")
    return ("given", "noncontiguous") if ndim >= 1 else ("given",)


def in_layout(x: torch.Tensor, layout: str, requires_grad: bool) -> torch.Tensor:
    """A fresh leaf with ``x``'s values in ``layout`` (non-contiguous strides are kept)."""
    x = x.detach()
    if layout == "given":
        out = x.clone()
    elif layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        out = x.clone(memory_format=fmt)
    elif layout == "noncontiguous":
        # Every other element of a doubled last dim: strided, with gaps in the storage.
        out = torch.empty(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)[..., ::2]
        out.copy_(x)
    else:
        raise ValueError(layout)
    return out.requires_grad_(requires_grad)


def memory_format_of(t: torch.Tensor) -> str:
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last"
    return "strided"


# ------------------------------------------------------------------------- comparison


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype.is_complex else torch.float64


def _real(dtype: torch.dtype) -> torch.dtype:
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)


def judge(what: str, ours, theirs, truth, dtype: torch.dtype, scale: float = 1.0) -> list[str]:
    """Problems with normlab's ``ours`` given torch.nn's ``theirs`` and the float64 ``truth``.

    ``dtype`` is the case's dtype; for float64 cases pass torch.nn's result as the truth.
    The slack is taken at max(``scale``, max |truth|).
    """
    if theirs is None or ours is None:
        if (theirs is None) != (ours is None):
            return [
                (
                    f"{what}: torch.nn gives {'none' if theirs is None else 'one'}, "
                    f"normlab {'none' if ours is None else 'one'}"
                )
            ]
        return []
    if ours.shape != theirs.shape:
        return [f"{what}: shape {tuple(ours.shape)}, torch.nn {tuple(theirs.shape)}"]
    problems = []
    if ours.dtype != theirs.dtype:
        problems.append(f"{what}: dtype {ours.dtype}, torch.nn {theirs.dtype}")
    if not (ours.is_floating_point() or ours.is_complex()):
        if not torch.equal(ours, theirs.to(ours.dtype)):
            problems.append(f"{what}: {ours.tolist()}, torch.nn {theirs.tolist()}")
        return problems
    if ours.numel() == 0:
        return problems
    wide = _wide(ours.dtype)
    o, t, u = (v.detach().to(wide).flatten() for v in (ours, theirs, truth))
    truth_finite = torch.isfinite(u)
    bad = ~truth_finite & torch.isfinite(o)
    if bad.any():
        i = int(bad.nonzero()[0])
        problems.append(
            f"{what}: finite where the float64 truth is not ({int(bad.sum())} of "
            f"{o.numel()}; at flat index {i}: normlab {o[i].item():.6g}, "
            f"truth {u[i].item()}, torch.nn {t[i].item():.6g})"
        )
    judged = truth_finite & torch.isfinite(t)
    bad = judged & ~torch.isfinite(o)
    if bad.any():
        i = int(bad.nonzero()[0])
        problems.append(
            f"{what}: non-finite where torch.nn and the truth are finite ({int(bad.sum())} "
            f"of {o.numel()}; at flat index {i}: normlab {o[i].item()}, "
            f"torch.nn {t[i].item():.6g})"
        )
    judged &= torch.isfinite(o)
    if not judged.any():
        return problems
    scale = max(1.0, scale, u[judged].abs().max().item())
    ulps = FLOAT64_ULPS if _real(dtype) == torch.float64 else SLACK_ULPS
    slack = ulps * torch.finfo(_real(dtype)).eps * scale
    err_ours = torch.where(judged, (o - u).abs(), 0)
    err_theirs = torch.where(judged, (t - u).abs(), 0)
    # In ulps at the scale: how much further from the truth normlab is than torch.nn.
    MARGINS.append((what, dtype, ((err_ours.max() - err_theirs.max()) / (slack / ulps)).item()))
    if err_ours.max() > err_theirs.max() + slack:
        i = int(err_ours.argmax())
        problems.append(
            f"{what}: max |normlab − truth| {err_ours.max().item():.3g} > torch.nn's "
            f"{err_theirs.max().item():.3g} + {slack:.2g} (at flat index {i}: normlab "
            f"{_num(o[i])}, torch.nn {_num(t[i])}, truth {_num(u[i])})"
        )
    return problems


def _num(v: torch.Tensor) -> str:
    v = v.item()
    return f"{v:.6g}" if isinstance(v, float) else f"{v:.4g}"


# ------------------------------------------------------------------------------ runs


@dataclass
class Run:
    """What one implementation did with one case."""

    output: torch.Tensor | None = None
    grads: dict[str, torch.Tensor | None] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor | None] = field(default_factory=dict)
    input_after: torch.Tensor | None = None
    error: BaseException | None = None
    stage: str = ""


def _torch_lacks_dtype(error: BaseException | None) -> bool:
    return isinstance(error, (RuntimeError, NotImplementedError)) and "not implemented for" in str(error)


def compare_runs(
    ours: Run,
    theirs: Run,
    truth: Run,
    dtype: torch.dtype,
    x_before: torch.Tensor | None,
    layout: str,
    input_grad_scale: float = 1.0,
) -> list[str]:
    """Every difference between normlab's run and torch.nn's (judged against the truth).

    ``input_grad_scale`` is the size of the terms the input gradient is computed from
    (see :func:`input_grad_scale`): where they cancel, as for a normalized extent of one
    element, rounding errors are relative to them, not to the (tiny) result.
    """
    if theirs.error is not None:
        if ours.error is None:
            return [
                (
                    f"torch.nn raises at {theirs.stage} ({type(theirs.error).__name__}: "
                    f"{_first_line(theirs.error)}); normlab computes"
                )
            ]
        if not isinstance(ours.error, type(theirs.error)):
            return [
                (
                    f"exception type: normlab raises {_qualname(ours.error)} at {ours.stage} "
                    f"({_first_line(ours.error)}); torch.nn raises {_qualname(theirs.error)} at "
                    f"{theirs.stage} ({_first_line(theirs.error)})"
                )
            ]
        return []
    if ours.error is not None:
        return [f"normlab raises {_qualname(ours.error)} at {ours.stage}: {_first_line(ours.error)}"]
    if truth.error is not None:
        raise AssertionError(f"the float64 truth run raised: {truth.error!r}")
    problems = judge("output", ours.output, theirs.output, truth.output, dtype)
    if ours.output is not None and theirs.output is not None and ours.output.numel() > 1:
        mine, yours = memory_format_of(ours.output), memory_format_of(theirs.output)
        if mine != yours:
            problems.append(f"output layout: {mine}, torch.nn {yours} (input {layout})")
    for name in sorted(set(ours.grads) | set(theirs.grads)):
        problems += judge(
            f"grad {name}",
            ours.grads.get(name),
            theirs.grads.get(name),
            truth.grads.get(name),
            dtype,
            input_grad_scale if name == "input" else 1.0,
        )
    if set(ours.buffers) != set(theirs.buffers):
        problems.append(f"buffers: {sorted(ours.buffers)}, torch.nn {sorted(theirs.buffers)}")
    for name in sorted(set(ours.buffers) & set(theirs.buffers)):
        problems += judge(f"buffer {name}", ours.buffers[name], theirs.buffers[name], truth.buffers[name], dtype)
    if (
        x_before is not None
        and ours.input_after is not None
        and not torch.equal(ours.input_after, x_before)
        and not ours.input_after.isnan().any()
    ):
        problems.append("the input was modified")
    return problems


def input_grad_scale(
    family: str,
    x: torch.Tensor,
    eps,
    grad_output: torch.Tensor,
    weight,
    *,
    groups: int = 1,
    normalized_ndim: int = 1,
    batched: bool = True,
) -> float:
    """max |γ| · max |∂L/∂y| · max 1/σ: the size of the terms of the input gradient.

    ``family`` is "batch", "instance", "group", "layer" or "rms"; σ² is the variance
    (the mean square for "rms") plus eps over that family's reduction of ``x``.
    """
    x = x.detach().to(torch.float64)
    if x.numel() == 0 or eps is None or not eps >= 0:
        return 1.0
    if family in ("layer", "rms"):
        groups_of = x.flatten(x.dim() - normalized_ndim) if normalized_ndim else x.unsqueeze(-1)
        flat = groups_of.reshape(-1, groups_of.shape[-1])
    elif family == "batch":
        flat = x.transpose(0, 1).reshape(x.shape[1], -1) if x.dim() > 1 else x.reshape(1, -1)
    elif family == "instance":
        flat = x.reshape(-1, x[0, 0].numel() if batched else x[0].numel())
    elif family == "group":
        flat = x.reshape(x.shape[0] * groups, -1)
    else:
        raise ValueError(family)
    if flat.shape[-1] == 0:
        return 1.0
    second = flat.pow(2).mean(-1) if family == "rms" else flat.var(-1, unbiased=False)
    rstd = (second + eps).rsqrt().max().item()
    w = 1.0 if weight is None or weight.numel() == 0 else weight.detach().abs().max().item()
    g = grad_output.detach().abs().max().item() if grad_output.numel() else 1.0
    scale = max(1.0, w) * g * rstd
    return scale if math.isfinite(scale) else 1.0


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""


def _qualname(error: BaseException) -> str:
    return type(error).__name__


def _backward(run: Run, output: torch.Tensor, grad_output: torch.Tensor | None) -> None:
    if output.requires_grad and grad_output is not None and grad_output.shape == output.shape:
        output.backward(grad_output.to(output.dtype))


def _seed(case_id: str) -> int:
    return zlib.crc32(case_id.encode())


# --------------------------------------------------------------------- module cases


@dataclass(frozen=True)
class ModuleCase:
    id: str
    name: str  # torch.nn class name
    dtype: torch.dtype
    training: bool
    index: int  # position in module_inputs_func's list
    layout: str


def module_cases() -> list[ModuleCase]:
    cases = []
    for name, info in module_infos().items():
        dtypes = list(info.dtypes) + [d for d in EXTRA_MODULE_DTYPES if d not in info.dtypes]
        modes = (True, False) if info.train_and_eval_differ else (True,)
        for dtype in sorted(dtypes, key=dtype_name):
            for training in modes:
                inputs = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training)
                for index, mi in enumerate(inputs):
                    x = mi.forward_input.args[0]
                    for layout in layouts_for(x.dim()):
                        case_id = (
                            f"nn.{name}/{mi.desc or 'default'}/{dtype_name(dtype)}/"
                            f"{'train' if training else 'eval'}/{layout}"
                        )
                        cases.append(ModuleCase(case_id, name, dtype, training, index, layout))
    return cases


def _module_inputs(case: ModuleCase):
    info = module_infos()[case.name]
    with torch.random.fork_rng():
        torch.manual_seed(_seed(case.id))
        mi = info.module_inputs_func(info, device="cpu", dtype=case.dtype, requires_grad=True, training=case.training)[
            case.index
        ]
    return mi.constructor_input.args, mi.constructor_input.kwargs, mi.forward_input.args[0]


def _run_module(ns, name, args, kwargs, state, dtype, training, x, layout, grad_output) -> Run:
    run = Run()
    try:
        run.stage = "construction"
        module = getattr(ns, name)(*args, **kwargs).to(dtype)
        run.stage = "load_state_dict"
        module.load_state_dict({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()})
        module.train(training)
        run.stage = "forward"
        xi = in_layout(x.to(dtype), layout, requires_grad=True)
        y = module(xi)
        run.output = y.detach().clone()
        run.stage = "backward"
        _backward(run, y, grad_output)
        run.grads = {"input": xi.grad}
        run.grads.update({n: p.grad for n, p in module.named_parameters()})
        run.buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
        run.input_after = xi.detach().clone()
    except Exception as error:  # noqa: BLE001 — every failure is a result here
        run.error = error
    return run


def reference_state(name, args, kwargs, dtype, generator) -> dict[str, torch.Tensor]:
    """torch.nn's module with randomized γ, β and running estimates, as a state dict."""
    module = getattr(nn, name)(*args, **kwargs).to(torch.float64)
    with torch.no_grad():
        for pname, p in module.named_parameters(recurse=False):
            values = torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.5
            p.copy_(values + (1.0 if pname == "weight" else 0.0))
        if getattr(module, "running_mean", None) is not None:
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.randn(shape, generator=generator, dtype=torch.float64))
            module.running_var.copy_(torch.rand(shape, generator=generator, dtype=torch.float64) + 0.5)
            # A counter past 0 makes momentum=None's 1/(k + 1) differ from 1.
            module.num_batches_tracked.fill_(2)
    # Round once to the case's dtype, so every run starts from the same values.
    return {k: (v.to(dtype).to(torch.float64) if v.is_floating_point() else v) for k, v in module.state_dict().items()}


def _truth_kwargs(name: str, args: tuple, kwargs: dict, dtype: torch.dtype):
    """RMSNorm's eps=None means the machine epsilon of the computation dtype; the float64
    truth must use the case's epsilon, not float64's."""
    if name != "RMSNorm":
        return args, kwargs
    bound = inspect.signature(nn.RMSNorm).bind(*args, **kwargs)
    if bound.arguments.get("eps") is not None:
        return args, kwargs
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else _real(dtype)
    bound.arguments["eps"] = torch.finfo(compute).eps
    return bound.args, bound.kwargs


def run_module_case(case: ModuleCase) -> tuple[list[str], str | None]:
    """(problems, skip reason or None) for one module case."""
    args, kwargs, x = _module_inputs(case)
    generator = torch.Generator().manual_seed(_seed(case.id) + 1)
    try:
        state = reference_state(case.name, args, kwargs, case.dtype, generator)
    except Exception as error:  # noqa: BLE001 — torch.nn rejects the constructor arguments
        state, construct_error = {}, error
    else:
        construct_error = None
    x = x.detach()
    grad_output = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(case.dtype)
    if construct_error is not None:
        theirs = Run(error=construct_error, stage="construction")
    else:
        theirs = _run_module(nn, case.name, args, kwargs, state, case.dtype, case.training, x, case.layout, grad_output)
    if _torch_lacks_dtype(theirs.error):
        return [], f"torch.nn has no CPU {case.dtype} kernel: {_first_line(theirs.error)}"
    ours = _run_module(nl.nn, case.name, args, kwargs, state, case.dtype, case.training, x, case.layout, grad_output)
    if case.dtype == torch.float64 or theirs.error is not None:
        truth = theirs
    else:
        targs, tkwargs = _truth_kwargs(case.name, args, kwargs, case.dtype)
        truth = _run_module(
            nn,
            case.name,
            targs,
            tkwargs,
            state,
            torch.float64,
            case.training,
            x.to(torch.float64),
            case.layout,
            grad_output.to(torch.float64),
        )
    x_before = in_layout(x, case.layout, requires_grad=False)
    scale = _module_grad_scale(case, args, kwargs, state, x, grad_output)
    return compare_runs(ours, theirs, truth, case.dtype, x_before, case.layout, scale), None


_FAMILY = {"Batch": "batch", "Insta": "instance", "Group": "group", "Layer": "layer", "RMSNo": "rms"}


def _module_grad_scale(case, args, kwargs, state, x, grad_output) -> float:
    try:
        module = getattr(nn, case.name)(*args, **kwargs)
    except Exception:  # noqa: BLE001 — torch.nn rejects it; nothing is compared
        return 1.0
    family = _FAMILY[case.name[:5]]
    eps = module.eps
    if eps is None:  # RMSNorm's default
        eps = torch.finfo(torch.float32 if case.dtype in HALF_TYPES else case.dtype).eps
    return input_grad_scale(
        family,
        x,
        eps,
        grad_output,
        state.get("weight"),
        groups=getattr(module, "num_groups", 1),
        normalized_ndim=len(getattr(module, "normalized_shape", ())),
        batched=x.dim() == int(case.name[-2]) + 2 if family == "instance" else True,
    )


# ------------------------------------------------------------------ functional cases


@dataclass(frozen=True)
class FunctionalCase:
    id: str
    name: str  # torch.nn.functional name
    dtype: torch.dtype
    index: int  # position in the OpInfo's reference inputs
    layout: str


@functools.cache
def _samples(name: str, dtype: torch.dtype) -> tuple:
    """The OpInfo's reference inputs (its sample inputs followed by any extra ones).

    Drawn once per (functional, dtype) from a fixed seed and shared by that functional's
    cases — OpInfo inspects the call stack for every input it yields, which costs more
    than running the case. Runs clone every tensor they take from here.
    """
    with torch.random.fork_rng():
        torch.manual_seed(_seed(f"{name}/{dtype_name(dtype)}"))
        return tuple(op_infos()[name].reference_inputs("cpu", dtype, requires_grad=True))


def functional_cases() -> list[FunctionalCase]:
    cases = []
    for name, op in op_infos().items():
        for dtype in sorted(op.dtypes, key=dtype_name):
            for index, sample in enumerate(_samples(name, dtype)):
                shape = "x".join(map(str, sample.input.shape)) or "scalar"
                for layout in layouts_for(sample.input.dim()):
                    case_id = f"F.{name}/{index:02d}-{shape}/{dtype_name(dtype)}/{layout}"
                    cases.append(FunctionalCase(case_id, name, dtype, index, layout))
    return cases


def describe_sample(sample) -> str:
    """The sample as Python source that rebuilds its arguments (shapes, not values)."""

    def show(v):
        if isinstance(v, torch.Tensor):
            return f"<{v.dtype} {tuple(v.shape)}{' grad' if v.requires_grad else ''}>"
        return repr(v)

    parts = [show(sample.input)] + [show(a) for a in sample.args]
    parts += [f"{k}={show(v)}" for k, v in sample.kwargs.items()]
    return ", ".join(parts)


def _run_functional(fn: Callable, sample, dtype, layout, grad_output, truth_eps=None) -> Run:
    run = Run(stage="call")

    def leaf(t):
        if isinstance(t, torch.Tensor):
            values = t.detach().to(dtype) if t.is_floating_point() or t.is_complex() else t.detach()
            return values.clone().requires_grad_(t.requires_grad)
        return t

    try:
        x = in_layout(sample.input.to(dtype), layout, requires_grad=sample.input.requires_grad)
        args = [leaf(a) for a in sample.args]
        kwargs = {k: leaf(v) for k, v in sample.kwargs.items()}
        if truth_eps is not None:
            kwargs["eps"] = truth_eps
        y = fn(x, *args, **kwargs)
        run.output = y.detach().clone()
        run.stage = "backward"
        _backward(run, y, grad_output)
        named = [(f"arg{i + 1}", a) for i, a in enumerate(args)] + list(kwargs.items())
        run.grads = {"input": x.grad} if x.requires_grad else {}
        run.grads.update({n: t.grad for n, t in named if isinstance(t, torch.Tensor) and t.requires_grad})
        # Tensors passed without grad are the running estimates: compare what the call left.
        run.buffers = {n: t.detach().clone() for n, t in named if isinstance(t, torch.Tensor) and not t.requires_grad}
        run.input_after = x.detach().clone()
    except Exception as error:  # noqa: BLE001 — every failure is a result here
        run.error = error
    return run


def _rms_truth_eps(sample, dtype):
    if "eps" in sample.kwargs and sample.kwargs["eps"] is not None:
        return None
    if len(sample.args) >= 3 and sample.args[2] is not None:
        return None
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else _real(dtype)
    return torch.finfo(compute).eps


def run_functional_case(case: FunctionalCase) -> tuple[list[str], str | None]:
    sample = _samples(case.name, case.dtype)[case.index]
    generator = torch.Generator().manual_seed(_seed(case.id) + 1)
    theirs_fn = getattr(TF, case.name)
    # Every norm keeps its input's shape, so the output gradient can be drawn up front.
    grad_output = torch.randn(sample.input.shape, generator=generator, dtype=torch.float64)
    if case.dtype.is_complex:
        imag = torch.randn(sample.input.shape, generator=generator, dtype=torch.float64)
        grad_output = torch.complex(grad_output, imag)
    grad_output = grad_output.to(case.dtype)
    theirs = _run_functional(theirs_fn, sample, case.dtype, case.layout, grad_output)
    if _torch_lacks_dtype(theirs.error):
        return [], f"torch.nn.functional has no CPU {case.dtype} kernel: {_first_line(theirs.error)}"
    ours = _run_functional(getattr(nl.functional, case.name), sample, case.dtype, case.layout, grad_output)
    if _real(case.dtype) == torch.float64 or theirs.error is not None:
        truth = theirs
    else:
        eps = _rms_truth_eps(sample, case.dtype) if case.name == "rms_norm" else None
        if eps is not None and len(sample.args) >= 3:
            raise AssertionError("rms_norm sample with a positional eps=None is not handled")
        truth = _run_functional(
            theirs_fn, sample, _wide(case.dtype), case.layout, grad_output.to(_wide(case.dtype)), truth_eps=eps
        )
    x_before = in_layout(sample.input.to(case.dtype), case.layout, requires_grad=False)
    scale = _functional_grad_scale(case, sample, grad_output)
    return compare_runs(ours, theirs, truth, case.dtype, x_before, case.layout, scale), None


def _functional_grad_scale(case, sample, grad_output) -> float:
    try:
        bound = inspect.signature(getattr(TF, case.name)).bind(sample.input, *sample.args, **sample.kwargs)
    except TypeError:
        return 1.0
    bound.apply_defaults()
    arguments = bound.arguments
    eps = arguments.get("eps")
    if eps is None:
        eps = torch.finfo(torch.float32 if case.dtype in HALF_TYPES else _real(case.dtype)).eps
    shape = arguments.get("normalized_shape", ())
    family = case.name.split("_")[0]
    return input_grad_scale(
        family,
        sample.input.real if sample.input.is_complex() else sample.input,
        eps,
        grad_output.abs() if grad_output.is_complex() else grad_output,
        None if arguments.get("weight") is None else arguments["weight"].abs(),
        groups=arguments.get("num_groups", 1),
        normalized_ndim=1 if isinstance(shape, int) else len(shape),
    )


# ------------------------------------------------------------------------ error cases


@dataclass(frozen=True)
class ErrorCase:
    id: str
    name: str
    index: int
    kind: str  # "module" or "functional"


def error_cases() -> list[ErrorCase]:
    cases = []
    for name, info in module_infos().items():
        if info.module_error_inputs_func is None:
            continue
        inputs = info.module_error_inputs_func(
            info, device="cpu", dtype=torch.float32, requires_grad=False, training=True
        )
        for index, _ in enumerate(inputs):
            cases.append(ErrorCase(f"nn.{name}/error{index}", name, index, "module"))
    for name, op in op_infos().items():
        if op.error_inputs_func is None:
            continue
        for index, _ in enumerate(op.error_inputs("cpu")):
            cases.append(ErrorCase(f"F.{name}/error{index}", name, index, "functional"))
    return cases


def _raise_module(ns, name, error_input) -> tuple[BaseException | None, str]:
    mi = error_input.module_error_input
    try:
        module = getattr(ns, name)(*mi.constructor_input.args, **mi.constructor_input.kwargs)
    except Exception as error:  # noqa: BLE001
        return error, "construction"
    try:
        module(*mi.forward_input.args, **mi.forward_input.kwargs)
    except Exception as error:  # noqa: BLE001
        return error, "forward"
    return None, ""


def run_error_case(case: ErrorCase) -> tuple[list[str], str | None]:
    torch.manual_seed(_seed(case.id))
    if case.kind == "module":
        info = module_infos()[case.name]
        error_input = info.module_error_inputs_func(
            info, device="cpu", dtype=torch.float32, requires_grad=False, training=True
        )[case.index]
        expected = error_input.error_type
        theirs, their_stage = _raise_module(nn, case.name, error_input)
        ours, our_stage = _raise_module(nl.nn, case.name, error_input)
    else:
        error_input = list(op_infos()[case.name].error_inputs("cpu"))[case.index]
        expected = error_input.error_type
        s = error_input.sample_input
        results = []
        for fn in (getattr(TF, case.name), getattr(nl.functional, case.name)):
            try:
                fn(s.input, *s.args, **s.kwargs)
                results.append((None, ""))
            except Exception as error:  # noqa: BLE001
                results.append((error, "call"))
        (theirs, their_stage), (ours, our_stage) = results
    if not isinstance(theirs, expected):
        return [], f"torch.nn does not raise {expected.__name__} here any more ({theirs!r})"
    if ours is None:
        return [
            (f"normlab does not raise; torch.nn raises {expected.__name__} at {their_stage}: {_first_line(theirs)}")
        ], None
    if not isinstance(ours, expected):
        return [
            (
                f"exception type: normlab raises {_qualname(ours)} at {our_stage} "
                f"({_first_line(ours)}); torch.nn raises {expected.__name__} at {their_stage} "
                f"({_first_line(theirs)})"
            )
        ], None
    return [], None
