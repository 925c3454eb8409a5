"""Bytes moved and kernels launched per call — counted, not timed — for normlab's Triton
kernels beside torch.nn's equivalent and the path normlab takes on CUDA without them.

Three counts, each stated as what it is:

* **launches**: the aten operators a call dispatches on the meta device, which takes the same
  path as CUDA (a ``TorchDispatchMode``; views and allocations launch nothing and are left
  out); for the Triton kernels, also the launches counted under Triton's interpreter.
* **bytes, Triton kernels**: every element each load and store of the kernels touches, counted
  inside Triton's interpreter (CPU tensors, the GPU's tiling) — exact for the kernels as
  written; on a GPU a re-read can hit L2, so it bounds DRAM traffic from above.
* **bytes, torch.nn and the composed path**: each operator charged its tensor inputs and
  outputs once (a lower bound for any kernel that computes it), plus, in the second column,
  the extra passes torch's CUDA norm kernels are written to make: BatchNorm and GroupNorm
  compute statistics in a kernel of their own before the elementwise pass (one more read of
  the input), and their backward reduces dy·x̂ in one kernel before dx in another (two more
  reads) — ``aten/src/ATen/native/cuda/Normalization.cuh`` and ``group_norm_kernel.cu``.

Bytes are given as *passes*: multiples of the input tensor's size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CASES", "OpCounter", "count_triton", "format_traffic_table", "run_traffic"]

# allocations: no kernel, no traffic
_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


def _cuda_extra_passes(name: str, args) -> int:
    """Input-sized reads torch's CUDA norm kernels make beyond the operator's own inputs and
    outputs (aten/src/ATen/native/cuda/Normalization.cuh, group_norm_kernel.cu,
    layer_norm_kernel.cu): training BatchNorm and GroupNorm compute statistics in a kernel of
    their own before the elementwise pass (1 more read of x); their backward reduces in one
    kernel and writes dx in another (dy and x read twice: 2 more; eval BatchNorm's dx kernel
    reads dy only: 1 more); LayerNorm's backward computes dγ, dβ in a kernel of its own (2)."""
    training = next((a for a in args if isinstance(a, bool)), True)  # BatchNorm's first bool argument
    if name in ("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional"):
        return 1 if training else 0
    if name == "native_batch_norm_backward":
        return 2 if training else 1
    if name == "native_group_norm":
        return 1
    if name in ("native_group_norm_backward", "native_layer_norm_backward"):
        return 2
    return 0


def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t`` (an expanded view is counted once)."""
    count = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            count *= size
    return count * t.element_size()


def _tensors(values) -> Iterator[torch.Tensor]:
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


class OpCounter(TorchDispatchMode):
    """Records every operator that launches work: ``(name, bytes read, bytes written, extra)``
    where ``extra`` is the input passes torch's CUDA kernels add (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in _NO_LAUNCH:
            return out
        inputs = list(_tensors(list(args) + list(kwargs.values())))
        read = sum(_distinct_bytes(t) for t in inputs)
        written = sum(_distinct_bytes(t) for t in _tensors(out if isinstance(out, (list, tuple)) else [out]))
        extra = _cuda_extra_passes(name, args) * (_distinct_bytes(inputs[0]) if inputs else 0)
        self.ops.append((name, read, written, extra))
        return out

    @property
    def launches(self) -> int:
        return len(self.ops)

    def bytes(self, cuda_passes: bool = False) -> int:
        return sum(r + w + (e if cuda_passes else 0) for _, r, w, e in self.ops)


#: tensors up to this size (parameters, per-channel statistics, masks of a few rows) are
#: charged their distinct bytes once per launch: every program re-reads them, from cache
SMALL_BYTES = 64 * 1024


@contextlib.contextmanager
def _interpreter_bytes() -> Iterator[dict[str, int]]:
    """Count the bytes the loads and stores of each launch touch inside Triton's interpreter:
    every access to a large tensor, the distinct elements of a small one (see SMALL_BYTES)."""
    import numpy as np
    from triton.runtime import interpreter

    from ..core.kernels.triton import _runtime

    builder = interpreter.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store
    counts = {"read": 0, "written": 0}
    small: list[tuple[int, int, set, str]] = []  # (start, end, addresses touched, "read"/"written")

    def charge(kind, ptrs, mask) -> None:
        addresses = np.broadcast_to(ptrs.data, ptrs.data.shape)[np.broadcast_to(mask.data, ptrs.data.shape)]
        if addresses.size == 0:
            return
        lo, hi = int(addresses.min()), int(addresses.max())
        for start, end, touched, what in small:
            if what == kind and start <= lo and hi < end:
                touched.update(addresses.tolist())
                return
        counts[kind] += int(addresses.size) * (ptrs.get_element_ty().primitive_bitwidth // 8)

    def counted_load(self, ptrs, mask, *rest):
        charge("read", ptrs, mask)
        return load(self, ptrs, mask, *rest)

    def counted_store(self, ptrs, value, mask, *rest):
        charge("written", ptrs, mask)
        return store(self, ptrs, value, mask, *rest)

    class SmallTensors:
        """Around each launch: which arguments are small, and what of them was touched."""

        def before(self, args) -> None:
            small.clear()
            for t in args:
                if isinstance(t, torch.Tensor) and 0 < t.untyped_storage().nbytes() <= SMALL_BYTES:
                    start = t.untyped_storage().data_ptr()
                    for what in ("read", "written"):
                        small.append((start, start + t.untyped_storage().nbytes(), set(), what))

        def after(self, args) -> None:
            for start, _, touched, what in small:
                counts[what] += len(touched) * _element_size(args, start)
            small.clear()

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    try:
        with _runtime.observe(SmallTensors()):
            yield counts
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store


def _element_size(args, start: int) -> int:
    for t in args:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == start:
            return t.element_size()
    return 1


@contextlib.contextmanager
def _gpu_tiling() -> Iterator[None]:
    """The tiling the kernels use on a GPU (the interpreter's default tiles differ, for speed)."""
    from ..core.kernels.triton import channel, row

    saved = channel.BATCH_PLANE_CHANNELS, row.BACKWARD_PROGRAMS
    channel.BATCH_PLANE_CHANNELS, row.BACKWARD_PROGRAMS = 1, 256
    try:
        yield
    finally:
        channel.BATCH_PLANE_CHANNELS, row.BACKWARD_PROGRAMS = saved


def _outputs(y) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    outputs = list(y) if isinstance(y, (tuple, list)) else [y]
    return outputs, [torch.ones_like(t) for t in outputs]


def count_triton(make: Callable[[], Callable]) -> dict[str, int]:
    """Launches and bytes of one forward and its backward under Triton's interpreter;
    ``make()`` prepares the inputs (outside the count) and returns the forward."""
    from ..core.kernels import triton as tk

    with _gpu_tiling():
        forward = make()
        with tk.count_launches() as launches, _interpreter_bytes() as moved:
            y = forward()
        fwd = {"launches": launches[0], "bytes": moved["read"] + moved["written"]}
        outputs, grads = _outputs(y)
        with tk.count_launches() as launches, _interpreter_bytes() as moved:
            torch.autograd.backward(outputs, grads)
        bwd = {"launches": launches[0], "bytes": moved["read"] + moved["written"]}
    return {
        "fwd_launches": fwd["launches"],
        "bwd_launches": bwd["launches"],
        "fwd_bytes": fwd["bytes"],
        "bwd_bytes": bwd["bytes"],
    }


def count_ops(make: Callable[[], Callable]) -> dict[str, object]:
    """Operators and bytes of one forward and its backward (meta tensors); ``make()`` prepares
    the inputs (outside the count) and returns the forward."""
    forward = make()
    with OpCounter() as fwd:
        y = forward()
    outputs, grads = _outputs(y)
    with OpCounter() as bwd:
        torch.autograd.backward(outputs, grads)
    return {
        "fwd_launches": fwd.launches,
        "bwd_launches": bwd.launches,
        "fwd_bytes": fwd.bytes(),
        "bwd_bytes": bwd.bytes(),
        "fwd_bytes_cuda": fwd.bytes(cuda_passes=True),
        "bwd_bytes_cuda": bwd.bytes(cuda_passes=True),
        "fwd_ops": [name for name, *_ in fwd.ops],
        "bwd_ops": [name for name, *_ in bwd.ops],
    }


# --- the calls ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One call, three ways: ``torch_nn``, ``normlab`` (the path normlab takes on CUDA without
    the Triton kernels) and ``triton``; each ``(device) -> make``: ``make()`` prepares fresh
    inputs and returns a zero-argument forward, whose outputs are differentiated."""

    name: str
    shape: tuple[int, ...]
    torch_nn: Callable
    normlab: Callable
    triton: Callable
    unit: str = "the input"


def _leaf(shape, device, layout=None):
    x = torch.randn(shape, device=device)
    if layout is not None:
        x = x.contiguous(memory_format=layout)
    return x.requires_grad_()


def _module_case(name, shape, torch_module, normlab_module, triton_call, layout=None, mask_shape=None, inplace=False):
    """``inplace``: the input is not a leaf that requires grad (the in-place mode overwrites it)."""

    def leaf(device):
        x = _leaf(shape, device, layout)
        return x.detach() if inplace else x

    def torch_nn(device):
        m = torch_module().to(device)

        def make():
            x = leaf(device)
            return lambda: m(x)

        return make

    def normlab(device):
        m = normlab_module().to(device)

        def make():
            x = leaf(device)
            if inplace:

                def forward():
                    # as _bn_act's: the last call's output, overwritten in place, starts afresh
                    x.detach_()
                    return m(x)

                return forward
            if mask_shape is None:
                return lambda: m(x)
            mask = torch.ones(mask_shape, dtype=torch.bool, device=device)
            return lambda: m(x, mask=mask)

        return make

    def triton(device):
        return lambda: triton_call(_leaf(shape, device, layout), device)

    return Case(name, shape, torch_nn, normlab, triton)


def _params(c, device):
    w = torch.ones(c, device=device, requires_grad=True)
    b = torch.zeros(c, device=device, requires_grad=True)
    return w, b


def _bn_act(activation, param=0.0, inplace=False, eval_mode=False):
    def make(x, device):
        from ..core.kernels import triton as tk

        c = x.shape[1]
        w, b = _params(c, device)
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
        counter = torch.zeros((), dtype=torch.long, device=device)
        if inplace:
            x = x.detach()  # one the in-place mode may overwrite; γ and β still get gradients

        def forward():
            if inplace:
                # called again (timing), the output of the last call is overwritten: start afresh,
                # or backward would run into the last call's graph, whose saved output is gone
                x.detach_()
            return tk.channel_norm(
                x,
                w,
                b,
                eps=1e-5,
                batch_stats=not eval_mode,
                running_mean=rm,
                running_var=rv,
                num_batches_tracked=counter,
                activation=activation,
                param=param,
                inplace=inplace,
            ).y

        return forward

    return make


def _gn_act(groups, activation, mask_shape=None):
    def make(x, device):
        from ..core.kernels import triton as tk

        w, b = _params(x.shape[1], device)
        mask = None if mask_shape is None else torch.ones(mask_shape, dtype=torch.bool, device=device)
        return lambda: tk.channel_norm(x, w, b, groups=groups, eps=1e-5, activation=activation, mask=mask).y

    return make


def _masked_bn(mask_shape):
    def make(x, device):
        from ..core.kernels import triton as tk

        c = x.shape[1]
        w, b = _params(c, device)
        mask = torch.ones(mask_shape, dtype=torch.bool, device=device)
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
        return lambda: tk.channel_norm(x, w, b, eps=1e-5, mask=mask, running_mean=rm, running_var=rv).y

    return make


def _add_norm_case(name, shape, centered):
    """The pre-norm step: s = x + r and y = norm(s), both used (gradients arrive at both)."""
    d = shape[-1]

    def torch_nn(device):
        from torch import nn

        norm = (nn.LayerNorm(d) if centered else nn.RMSNorm(d)).to(device)
        if device == "meta" and not centered:
            # On CUDA torch.rms_norm runs aten._fused_rms_norm, LayerNorm's kernels without the
            # mean; the meta device decomposes it into 7 operators (16 backward), so the count
            # stands in LayerNorm without β, the structure CUDA runs
            norm = nn.LayerNorm(d, bias=False).to(device)

        def make():
            x, r = _leaf(shape, device), _leaf(shape, device)

            def forward():
                s = x + r
                return norm(s), s

            return forward

        return make

    def normlab(device):
        import normlab as nl

        norm = (nl.nn.AddLayerNorm(d) if centered else nl.nn.AddRMSNorm(d)).to(device)

        def make():
            x, r = _leaf(shape, device), _leaf(shape, device)
            return lambda: norm(x, r)

        return make

    def triton(device):
        from ..core.kernels import triton as tk

        w = torch.ones(d, device=device, requires_grad=True)
        b = torch.zeros(d, device=device, requires_grad=True) if centered else None

        def make():
            x, r = _leaf(shape, device), _leaf(shape, device)
            return lambda: tk.row_norm(x, (d,), w, b, 1e-5, centered=centered, residual=r)

        return make

    return Case(name, shape, torch_nn, normlab, triton)


def _cases(small: bool = False) -> list[Case]:
    """The calls of the table; ``small``: the same calls on tiny shapes (a check that each runs)."""
    import torch.nn as nn

    import normlab as nl

    cl = torch.channels_last
    c = 8 if small else 64
    image = (2, c, 3, 3) if small else (8, c, 14, 14)
    larger = (2, c, 5, 5) if small else (16, c, 28, 28)  # N·H·W = 12544: streamed
    seq = (2, c, 5) if small else (8, c, 100)
    tokens = (2, 3, 16) if small else (4, 64, 768)
    cases = [
        _module_case(
            f"BatchNorm2d + ReLU, training{label} {shape}",
            shape,
            lambda: nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()),
            lambda: nl.nn.BatchNormAct2d(c, activation="relu"),
            _bn_act("relu"),
            layout=layout,
        )
        for shape, label, layout in ((image, "", None), (larger, "", None), (image, ", channels_last", cl))
    ]
    cases += [
        _module_case(
            f"BatchNorm2d + SiLU, eval {image}",
            image,
            lambda: nn.Sequential(nn.BatchNorm2d(c), nn.SiLU()).eval(),
            lambda: nl.nn.BatchNormAct2d(c, activation="silu").eval(),
            _bn_act("silu", eval_mode=True),
        ),
        _module_case(
            f"GroupNorm(8) + ReLU {image}",
            image,
            lambda: nn.Sequential(nn.GroupNorm(8, c), nn.ReLU()),
            lambda: nl.nn.GroupNormAct(8, c, activation="relu"),
            _gn_act(8, "relu"),
        ),
        _module_case(
            f"GroupNorm(8) + SiLU, channels_last {image}",
            image,
            lambda: nn.Sequential(nn.GroupNorm(8, c), nn.SiLU()),
            lambda: nl.nn.GroupNormAct(8, c, activation="silu"),
            _gn_act(8, "silu"),
            layout=cl,
        ),
        _module_case(
            f"BatchNorm2d + LeakyReLU, in place {image}",
            image,
            lambda: nn.Sequential(nn.BatchNorm2d(c), nn.LeakyReLU(0.01, inplace=True)),
            lambda: nl.nn.BatchNormAct2d(c, activation="leaky_relu", inplace=True),
            _bn_act("leaky_relu", 0.01, inplace=True),
            inplace=True,
        ),
        _module_case(
            f"masked BatchNorm1d {seq} [torch.nn: unmasked]",
            seq,
            lambda: nn.BatchNorm1d(c),
            lambda: nl.nn.BatchNorm1d(c),
            _masked_bn((seq[0], seq[2])),
            mask_shape=(seq[0], seq[2]),
        ),
        _module_case(
            f"masked GroupNorm(8) {seq} [torch.nn: unmasked]",
            seq,
            lambda: nn.GroupNorm(8, c),
            lambda: nl.nn.GroupNorm(8, c),
            _gn_act(8, "identity", mask_shape=(seq[0], seq[2])),
            mask_shape=(seq[0], seq[2]),
        ),
        _add_norm_case(f"x + r, RMSNorm {tokens}", tokens, centered=False),
        _add_norm_case(f"x + r, LayerNorm {tokens}", tokens, centered=True),
    ]
    return cases


CASES = _cases


def run_traffic(names: tuple[str, ...] | None = None, progress: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per case: launches and passes for torch.nn, normlab's path without the Triton
    kernels, and the Triton kernels (meta counts and interpreter counts)."""
    from ..core.kernels import triton as tk

    if not tk.interpreted():
        raise RuntimeError(
            "counting the Triton kernels' bytes needs Triton's interpreter: run with TRITON_INTERPRET=1 "
            "(set before normlab is imported)"
        )
    rows = []
    for case in _cases():
        if names and not any(n in case.name for n in names):
            continue
        unit = 4
        for d in case.shape:
            unit *= d
        theirs = count_ops(case.torch_nn("meta"))
        try:
            composed = count_ops(case.normlab("meta"))
        except NotImplementedError:  # the composed in-place mode reads γ with nonzero(), which meta cannot
            composed = None
        ours_meta = count_ops(case.triton("meta"))
        ours = count_triton(case.triton("cpu"))
        row = {
            "call": case.name,
            "shape": list(case.shape),
            "torch_nn": theirs,
            "normlab_without_triton": composed,
            "triton_meta": ours_meta,
            "triton": ours,
            "passes": {
                "torch_nn": (theirs["fwd_bytes"] / unit, theirs["bwd_bytes"] / unit),
                "torch_nn_cuda": (theirs["fwd_bytes_cuda"] / unit, theirs["bwd_bytes_cuda"] / unit),
                "normlab_without_triton": None
                if composed is None
                else (composed["fwd_bytes_cuda"] / unit, composed["bwd_bytes_cuda"] / unit),
                "triton": (ours["fwd_bytes"] / unit, ours["bwd_bytes"] / unit),
            },
        }
        rows.append(row)
        if progress:
            progress(row)
    return rows


def format_traffic_table(rows: list[dict]) -> str:
    """Markdown: launches fwd/bwd and passes fwd+bwd, three ways, and the ratio."""
    head = (
        "| call | launches fwd / bwd: torch.nn · normlab without Triton · Triton (meta, interpreter) "
        "| passes fwd + bwd: torch.nn (ops · CUDA kernels) · normlab without Triton · Triton | Triton / torch.nn CUDA |\n"
        "|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        t, c, m, o = r["torch_nn"], r["normlab_without_triton"], r["triton_meta"], r["triton"]
        p = r["passes"]
        theirs_cuda = sum(p["torch_nn_cuda"])
        ours = sum(p["triton"])
        composed = "n/a" if c is None else f"{c['fwd_launches']}/{c['bwd_launches']}"
        composed_passes = "n/a" if c is None else f"{sum(p['normlab_without_triton']):.2f}"
        lines.append(
            f"| {r['call']} | {t['fwd_launches']}/{t['bwd_launches']} · {composed} · "
            f"{m['fwd_launches']}/{m['bwd_launches']}, {o['fwd_launches']}/{o['bwd_launches']} "
            f"| {sum(p['torch_nn']):.2f} · {theirs_cuda:.2f} · {composed_passes} · "
            f"{p['triton'][0]:.2f} + {p['triton'][1]:.2f} = {ours:.2f} | {ours / theirs_cuda:.2f} |"
        )
    return "\n".join(lines)
