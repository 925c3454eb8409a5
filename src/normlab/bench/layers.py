"""normlab's layers against torch.nn's, on the shapes and layouts that matter, in one run.

For every row: the median forward and forward+backward time of normlab and of torch.nn,
measured round-robin with a preallocated copy of the same tensor (the memory-bandwidth
floor); their ratio; each as a multiple of the copy; the bytes each keeps for backward;
and the largest difference between the two (outputs and input gradients, relative to the
largest value). Parameters are randomized and shared by both sides.

Allocator: by default the process's glibc malloc is told to keep freed memory
(M_MMAP_THRESHOLD/M_TRIM_THRESHOLD), as jemalloc or tcmalloc would in a training job.
Otherwise every fresh activation-sized tensor is mapped anew and page-faults on first
touch, which costs more than the kernels being compared and swamps the comparison.
``--default-malloc`` measures without it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .. import nn as nln
from .common import device_clock, text_table, threads_kept, tune_malloc
from .common import max_rel_diff as _max_rel_diff
from .timing import interleaved_medians

__all__ = ["LayerCase", "cases", "format_layer_table", "run_layer_benchmark", "tune_malloc"]

SHAPES_4D = ((32, 64, 56, 56), (8, 256, 28, 28), (2, 512, 14, 14), (128, 256, 8, 8))
SHAPES_ROWS = ((8192, 768), (64, 197, 768))
SHAPE_BN1D = (4096, 1024)


@dataclass(frozen=True)
class LayerCase:
    layer: str
    shape: tuple[int, ...]
    layout: str  # "NCHW", "channels_last" or "rows"
    ours: Callable[[int], nn.Module]
    theirs: Callable[[int], nn.Module]
    train: bool = True
    inplace: bool = False  # the layer overwrites its input: refresh it before every call
    # The activation has a kink at 0 (ReLU, LeakyReLU): where the pre-activation is within
    # float32 rounding of 0, float32 and float64 may take different sides, and the input
    # gradient there legitimately differs by a whole |dy|. Those entries are left out of the
    # gradient comparison (counted in the row as ``kink_excluded``).
    kinked: bool = False
    # forward(x, residual) -> (normed, summed): the fused residual add + norm rows, whose
    # backward receives a gradient on both outputs
    residual: bool = False


class _UnfusedAddLayerNorm(nn.LayerNorm):
    """torch's unfused pre-norm step, ``x + r`` then ``nn.LayerNorm`` (same state dict)."""

    def forward(self, x, residual):
        summed = x + residual
        return super().forward(summed), summed


class _UnfusedAddRMSNorm(nn.RMSNorm):
    """``x + r`` then ``nn.RMSNorm``."""

    def forward(self, x, residual):
        summed = x + residual
        return super().forward(summed), summed


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 0.5 + (0.75 if name.endswith("weight") else -0.25))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return module


def cases(quick: bool = False) -> list[LayerCase]:
    """The benchmark rows (a small subset with ``quick``)."""
    shapes = ((8, 256, 28, 28),) if quick else SHAPES_4D
    rows = []
    for shape in shapes:
        for layout in ("NCHW", "channels_last"):
            rows += [
                LayerCase("BatchNorm2d train", shape, layout, nln.BatchNorm2d, nn.BatchNorm2d),
                LayerCase("BatchNorm2d eval", shape, layout, nln.BatchNorm2d, nn.BatchNorm2d, train=False),
                LayerCase(
                    "GroupNorm(32)", shape, layout, lambda c: nln.GroupNorm(32, c), lambda c: nn.GroupNorm(32, c)
                ),
                LayerCase(
                    "InstanceNorm2d",
                    shape,
                    layout,
                    lambda c: nln.InstanceNorm2d(c, affine=True),
                    lambda c: nn.InstanceNorm2d(c, affine=True),
                ),
                LayerCase(
                    "BatchNormAct2d relu",
                    shape,
                    layout,
                    lambda c: nln.BatchNormAct2d(c, activation="relu"),
                    lambda c: nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True)),
                    kinked=True,
                ),
                LayerCase(
                    "BatchNormAct2d leaky, in-place",
                    shape,
                    layout,
                    lambda c: nln.BatchNormAct2d(c, activation="leaky_relu", inplace=True),
                    lambda c: nn.Sequential(nn.BatchNorm2d(c), nn.LeakyReLU(0.01, inplace=True)),
                    inplace=True,
                    kinked=True,
                ),
                LayerCase(
                    "GroupNormAct(32) silu",
                    shape,
                    layout,
                    lambda c: nln.GroupNormAct(32, c, activation="silu"),
                    lambda c: nn.Sequential(nn.GroupNorm(32, c), nn.SiLU()),
                ),
            ]
    for shape in SHAPES_ROWS[:1] if quick else SHAPES_ROWS:
        rows += [
            LayerCase("LayerNorm", shape, "rows", nln.LayerNorm, nn.LayerNorm),
            LayerCase("RMSNorm", shape, "rows", nln.RMSNorm, nn.RMSNorm),
            LayerCase("add_layer_norm", shape, "rows", nln.AddLayerNorm, _UnfusedAddLayerNorm, residual=True),
            LayerCase("add_rms_norm", shape, "rows", nln.AddRMSNorm, _UnfusedAddRMSNorm, residual=True),
        ]
    if not quick:
        rows += [
            LayerCase("BatchNorm1d train", SHAPE_BN1D, "rows", nln.BatchNorm1d, nn.BatchNorm1d),
            LayerCase("BatchNorm1d eval", SHAPE_BN1D, "rows", nln.BatchNorm1d, nn.BatchNorm1d, train=False),
        ]
    return rows


def _saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(v for v in storages.values() if v > 64 * 1024)  # activations, not γ/β/statistics


def run_case(case: LayerCase, threads: int, repeats: int, device: str | torch.device = "cpu") -> dict:
    torch.set_num_threads(threads)
    channels = case.shape[-1] if case.layout == "rows" and "Norm1d" not in case.layer else case.shape[1]
    arg = channels
    ours = _randomize(case.ours(arg)).to(device)
    theirs = case.theirs(arg).to(device)
    initial = {k: v.clone() for k, v in ours.state_dict().items()}

    def sync():  # both sides from the same parameters and statistics
        ours.load_state_dict(initial)
        norm = theirs[0] if isinstance(theirs, nn.Sequential) else theirs
        norm.load_state_dict({k: v for k, v in initial.items() if not k.startswith("act.")})

    sync()
    for m in (ours, theirs):
        m.train(case.train)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(case.shape, generator=g) * 1.5 + 0.5).to(device)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(case.shape, generator=g).to(device)
    if case.layout == "channels_last":
        dy = dy.contiguous(memory_format=torch.channels_last)
    # the residual rows: the residual stream, and the gradient reaching the sum directly
    res = torch.randn(case.shape, generator=g).to(device) if case.residual else None
    ds = torch.randn(case.shape, generator=g).to(device) if case.residual else None
    res_leaf = res.clone().requires_grad_(case.train) if case.residual else None
    floor = torch.empty_like(x)
    leaf = x.clone().requires_grad_(case.train)
    buffer = torch.empty_like(x)

    def forward(module):
        if case.residual:
            return module(leaf, res_leaf)
        if case.inplace:  # a fresh input to overwrite, made the same way on both sides
            if case.train:
                return module(leaf * 1.0)
            buffer.copy_(x)
            return module(buffer)
        return module(leaf)

    def forward_backward(module):
        leaf.grad = None
        if case.residual:
            res_leaf.grad = None
            torch.autograd.backward(forward(module), (dy, ds))
            return
        forward(module).backward(dy)

    def inference(module):  # eval rows: inference, as in deployment (no autograd graph)
        with torch.no_grad():
            return forward(module)

    fwd = forward if case.train else inference
    fns = {"copy": lambda: floor.copy_(x), "ours_fwd": lambda: fwd(ours), "torch_fwd": lambda: fwd(theirs)}
    if case.train:
        fns.update(ours_fb=lambda: forward_backward(ours), torch_fb=lambda: forward_backward(theirs))
    times = interleaved_medians(fns, repeats=repeats, shuffle=True, clock=device_clock(torch.device(device)))

    # Correctness, once, from the same state on both sides, each also against a float64 run
    # of the torch.nn layer (float32 reductions over 10⁵ values are not exact on either side).
    def outputs(module, source, grad_out):
        inp = source.detach().clone().requires_grad_(case.train)
        if case.residual:
            other = res.detach().to(source.dtype).clone().requires_grad_(case.train)
            normed, summed = module(inp, other)
            if not case.train:
                return [normed.detach(), summed.detach()]
            torch.autograd.backward((normed, summed), (grad_out, ds.to(source.dtype)))
            return [normed.detach(), summed.detach(), inp.grad, other.grad]
        out = module(inp * 1.0 if case.inplace and case.train else inp)
        if not case.train:
            return [out.detach()]
        out.backward(grad_out)
        return [out.detach(), inp.grad]

    sync()
    got_ours = outputs(ours, x, dy)
    got_theirs = outputs(theirs, x, dy)
    exact = copy.deepcopy(theirs).double()
    reference = outputs(exact, x.double(), dy.double())
    excluded = 0
    if case.kinked and case.train:
        with torch.no_grad():  # torch.nn's side is Sequential(norm, activation): its norm alone
            pre = exact[0](x.double())
        near_kink = pre.abs() <= 1e-5 * pre.abs().max()
        excluded = int(near_kink.sum())
        for got in (got_ours, got_theirs, reference):
            got[1] = got[1].masked_fill(near_kink, 0.0)
    diff = max(_max_rel_diff(a, b) for a, b in zip(got_ours, got_theirs))
    err_ours = max(_max_rel_diff(a, b) for a, b in zip(got_ours, reference))
    err_torch = max(_max_rel_diff(a, b) for a, b in zip(got_theirs, reference))
    row = {
        "layer": case.layer,
        "shape": "x".join(map(str, case.shape)),
        "layout": case.layout,
        "threads": threads,
        "device": str(device),
        "copy_ms": 1e3 * times["copy"],
        "fwd_ours_copy": times["ours_fwd"] / times["copy"],
        "fwd_torch_copy": times["torch_fwd"] / times["copy"],
        "fwd_ratio": times["ours_fwd"] / times["torch_fwd"],
        "max_rel_diff": diff,
        "err_ours": err_ours,
        "err_torch": err_torch,
        "kink_excluded": excluded,
    }
    if case.train:
        row.update(
            fb_ours_copy=times["ours_fb"] / times["copy"],
            fb_torch_copy=times["torch_fb"] / times["copy"],
            fb_ratio=times["ours_fb"] / times["torch_fb"],
            saved_mb_ours=_saved_bytes(lambda: forward(ours)) / 2**20,
            saved_mb_torch=_saved_bytes(lambda: forward(theirs)) / 2**20,
        )
    return row


def run_layer_benchmark(
    *,
    quick: bool = False,
    threads=(1, 2),
    repeats: int | None = None,
    progress: Callable[[dict], None] | None = None,
    device: str | torch.device = "cpu",
) -> list[dict]:
    rows = []
    with threads_kept():
        for n in threads:
            for case in cases(quick):
                reps = repeats or (7 if quick else 15)
                row = run_case(case, n, reps, device=device)
                rows.append(row)
                if progress:
                    progress(row)
    return rows


def _fmt(value, digits=2):
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_layer_table(rows: list[dict]) -> str:
    header = (
        f"{'layer':<31}{'shape':<14}{'layout':<14}{'thr':>3} | {'fwd ours':>8}{'torch':>7}{'ratio':>7} | "
        f"{'f+b ours':>8}{'torch':>7}{'ratio':>7} | {'saved MB ours/torch':>19} | {'err vs f64 ours/torch':>21}"
    )
    lines = []
    for r in rows:
        saved = f"{r['saved_mb_ours']:.1f} / {r['saved_mb_torch']:.1f}" if "saved_mb_ours" in r else ""
        lines.append(
            f"{r['layer']:<31}{r['shape']:<14}{r['layout']:<14}{r['threads']:>3} | "
            f"{_fmt(r['fwd_ours_copy']):>7}x{_fmt(r['fwd_torch_copy']):>6}x{_fmt(r['fwd_ratio']):>7} | "
            f"{_fmt(r.get('fb_ours_copy')):>7}{'x' if 'fb_ours_copy' in r else ' '}"
            f"{_fmt(r.get('fb_torch_copy')):>6}{'x' if 'fb_ours_copy' in r else ' '}{_fmt(r.get('fb_ratio')):>7} | "
            f"{saved:>19} | {r['err_ours']:>9.1e} / {r['err_torch']:.1e}"
        )
    return text_table(header, lines)


def summary(rows: list[dict]) -> dict:
    """How many rows meet each goal of the fast-path work."""
    train = [r for r in rows if "fb_ratio" in r]
    eval_bn = [r for r in rows if r["layer"].startswith("BatchNorm") and "eval" in r["layer"]]
    add_norm = [r for r in train if r["layer"].startswith("add_")]
    return {
        "rows": len(rows),
        "not_slower_than_torch": sum(r["fwd_ratio"] <= 1.0 and r.get("fb_ratio", 0) <= 1.0 for r in rows),
        "train_fwd_le_2x_copy": sum(r["fwd_ours_copy"] <= 2.0 for r in train),
        "train_fb_le_5x_copy": sum(r["fb_ours_copy"] <= 5.0 for r in train),
        "train_rows": len(train),
        "eval_bn_le_1_2x_copy": sum(r["fwd_ours_copy"] <= 1.2 for r in eval_bn),
        "eval_bn_rows": len(eval_bn),
        # the fused residual add + norm against x + r then torch.nn's norm
        "add_norm_fb_le_0_6x_torch": sum(r["fb_ratio"] <= 0.6 for r in add_norm),
        "add_norm_saved_le_torch": sum(r["saved_mb_ours"] <= r["saved_mb_torch"] for r in add_norm),
        "add_norm_rows": len(add_norm),
        "max_rel_diff": max(r["max_rel_diff"] for r in rows),
        "max_err_ours": max(r["err_ours"] for r in rows),
        "max_err_torch": max(r["err_torch"] for r in rows),
        "within_1e-5_of_torch": sum(r["max_rel_diff"] <= 1e-5 for r in rows),
        "no_less_accurate_than_torch": sum(r["err_ours"] <= max(r["err_torch"], 1e-6) for r in rows),
    }


def case_dict(case: LayerCase) -> dict:
    d = asdict(case)
    d.pop("ours"), d.pop("theirs")
    return d
