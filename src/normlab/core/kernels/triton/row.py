"""The row family in Triton: LayerNorm and RMSNorm over the trailing k elements of each row,
optionally after a residual add (s = x + r, y = norm(s), both written), forward and
closed-form backward, one launch each.

Forward: a program per row, the row in registers (k ≤ :data:`MAX_ROW`): read x (and r) once,
write y (and s) once. LayerNorm's mean is carried as ``shift + offset`` (the float32 mean and
the mean of x − shift, exact differences), so 1e4 ± 0.01 rows keep float32 accuracy; RMSNorm
has no cancellation to guard against.

Backward: each program takes a contiguous run of rows, writes their dx (plus the incoming
gradient of s, for the add), and keeps its share of dγ = Σ dy·x̂ and dβ = Σ dy in registers;
the last program to arrive (a semaphore, as in ``channel.py``) sums the shares.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import INTERPRETED, launch, semaphore
from .activation import cast_to

__all__ = ["MAX_ROW", "row_backward", "row_forward"]

#: the longest row a program holds in registers; longer rows go to torch's kernels
MAX_ROW = 65536
#: programs of the backward at most (each a run of rows, about twice a large GPU's
#: multiprocessors; fewer under the interpreter, where each program costs milliseconds of Python)
BACKWARD_PROGRAMS = 8 if INTERPRETED else 256
#: rows per backward program at least: each program writes, and the last reads back, a (k,)
#: share of dγ and dβ, which must stay small beside the rows themselves (1/8 of a pass here)
MIN_ROWS_PER_PROGRAM = 16


@triton.jit  # type: ignore[untyped-decorator]  # triton ships no types
def _row_forward_kernel(  # type: ignore[no-untyped-def]  # a kernel's parameters: Triton values
    x_ptr,
    r_ptr,
    s_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    stats_ptr,  # (3, rows) float32: shift, offset, rstd
    ROWS,
    K,
    eps,
    HAS_RES: tl.constexpr,
    CENTERED: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    ok = cols < K
    base = row.to(tl.int64) * K
    v = tl.load(x_ptr + base + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        v += tl.load(r_ptr + base + cols, mask=ok, other=0.0).to(tl.float32)
        s = cast_to(v, s_ptr.dtype.element_ty)
        tl.store(s_ptr + base + cols, s, mask=ok)
        v = s.to(tl.float32)  # normalize the sum as stored, as the unfused ops do
    if CENTERED:
        shift = tl.sum(v, 0) / K
        d = tl.where(ok, v - shift, 0.0)
        offset = tl.sum(d, 0) / K
        var = tl.maximum(tl.sum(d * d, 0) / K - offset * offset, 0.0)
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        xhat = (d - offset) * rstd
    else:
        shift = 0.0
        offset = 0.0
        rstd = 1.0 / tl.sqrt_rn(tl.sum(v * v, 0) / K + eps)
        xhat = v * rstd
    if HAS_W:
        xhat = xhat * tl.load(w_ptr + cols, mask=ok, other=1.0).to(tl.float32)
    if HAS_B:
        xhat = xhat + tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + base + cols, cast_to(xhat, y_ptr.dtype.element_ty), mask=ok)
    tl.store(stats_ptr + row, shift)
    tl.store(stats_ptr + ROWS + row, offset)
    tl.store(stats_ptr + 2 * ROWS + row, rstd)


@triton.jit  # type: ignore[untyped-decorator]  # triton ships no types
def _row_backward_kernel(  # type: ignore[no-untyped-def]  # a kernel's parameters: Triton values
    dy_ptr,
    ds_ptr,  # the gradient arriving at s (add), added to dx
    s_ptr,  # the normalized rows: x, or s = x + r
    w_ptr,
    stats_ptr,
    dx_ptr,
    part_ptr,  # (2, programs, K) float32: each program's share of dγ and dβ
    dw_ptr,
    db_ptr,
    sem_ptr,
    ROWS,
    K,
    ROWS_PER_PROGRAM,
    HAS_DS: tl.constexpr,
    CENTERED: tl.constexpr,
    HAS_W: tl.constexpr,
    PARAMS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_K)
    ok = cols < K
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    else:
        w = tl.where(ok, 1.0, 0.0)
    acc_w = tl.zeros([BLOCK_K], tl.float32)
    acc_b = tl.zeros([BLOCK_K], tl.float32)
    for i in range(0, ROWS_PER_PROGRAM):
        row = pid * ROWS_PER_PROGRAM + i
        here = ok & ((cols * 0 + row) < ROWS)
        base = row.to(tl.int64) * K
        s = tl.load(s_ptr + base + cols, mask=here, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + base + cols, mask=here, other=0.0).to(tl.float32)
        stat = tl.minimum(row, ROWS - 1)  # past the last row everything is masked anyway
        rstd = tl.load(stats_ptr + 2 * ROWS + stat)
        if CENTERED:
            shift = tl.load(stats_ptr + stat)
            offset = tl.load(stats_ptr + ROWS + stat)
            xhat = tl.where(here, ((s - shift) - offset) * rstd, 0.0)
        else:
            xhat = s * rstd
        g = dy * w
        mean_gx = tl.sum(g * xhat, 0) / K
        if CENTERED:
            dx = rstd * (g - tl.sum(g, 0) / K - xhat * mean_gx)
        else:
            dx = rstd * (g - xhat * mean_gx)
        if HAS_DS:
            dx += tl.load(ds_ptr + base + cols, mask=here, other=0.0).to(tl.float32)
        tl.store(dx_ptr + base + cols, cast_to(dx, dx_ptr.dtype.element_ty), mask=here)
        acc_w += dy * xhat
        acc_b += dy
    if PARAMS:
        tl.store(part_ptr + pid * K + cols, acc_w, mask=ok)
        tl.store(part_ptr + (programs + pid) * K + cols, acc_b, mask=ok)
        arrived = tl.atomic_add(sem_ptr, 1, sem="acq_rel")
        if arrived == programs - 1:
            total_w = tl.zeros([BLOCK_K], tl.float32)
            total_b = tl.zeros([BLOCK_K], tl.float32)
            for p in range(0, programs):
                total_w += tl.load(part_ptr + p * K + cols, mask=ok, other=0.0, volatile=True)
                total_b += tl.load(part_ptr + (programs + p) * K + cols, mask=ok, other=0.0, volatile=True)
            tl.store(dw_ptr + cols, total_w, mask=ok)
            tl.store(db_ptr + cols, total_b, mask=ok)
            tl.atomic_xchg(sem_ptr, 0)


def _block(k: int) -> int:
    return 1 << max(0, (k - 1).bit_length())


def _warps(k: int) -> int:
    return 4 if k <= 1024 else 8 if k <= 8192 else 16


def row_forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    k: int,
    eps: float,
    centered: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch: ``(y, s, stats)`` for contiguous ``x`` (and ``residual``, same shape);
    ``s = x + residual`` (empty without one), ``stats`` (3, rows) float32."""
    rows = x.numel() // k
    y = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else x.new_empty(0)
    stats = torch.empty((3, rows), dtype=torch.float32, device=x.device)
    launch(
        _row_forward_kernel,
        (rows,),
        x,
        x if residual is None else residual,
        x if residual is None else s,
        y,
        x if weight is None else weight,
        x if bias is None else bias,
        stats,
        rows,
        k,
        float(eps),
        HAS_RES=residual is not None,
        CENTERED=centered,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        BLOCK_K=_block(k),
        num_warps=_warps(k),
    )
    return y, s, stats


def row_backward(
    dy: torch.Tensor,
    ds: torch.Tensor | None,
    s: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    k: int,
    centered: bool,
    params: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch: ``(dx, dγ, dβ)`` (dγ, dβ float32 (k,), empty without ``params``); with
    ``ds`` (the add), dx is the gradient of the sum: ds + the norm's."""
    rows = s.numel() // k
    dy = dy.contiguous()
    ds = ds.contiguous() if ds is not None else None
    dx = torch.empty_like(s)
    if rows == 0:  # no program to launch: the sums over no rows are 0
        zeros = torch.zeros(k if params else 0, dtype=torch.float32, device=s.device)
        return dx, zeros, zeros.clone()
    programs = max(1, min(-(-rows // MIN_ROWS_PER_PROGRAM), BACKWARD_PROGRAMS))
    per_program = -(-rows // programs)
    programs = -(-rows // per_program)
    dw = torch.empty(k if params else 0, dtype=torch.float32, device=s.device)
    db = torch.empty(k if params else 0, dtype=torch.float32, device=s.device)
    part = torch.empty((2, programs, k) if params else (0,), dtype=torch.float32, device=s.device)
    launch(
        _row_backward_kernel,
        (programs,),
        dy,
        dy if ds is None else ds,
        s,
        s if weight is None else weight,
        stats,
        dx,
        part if params else dx,
        dw if params else dx,
        db if params else dx,
        semaphore(s),
        rows,
        k,
        per_program,
        HAS_DS=ds is not None,
        CENTERED=centered,
        HAS_W=weight is not None,
        PARAMS=params,
        BLOCK_K=_block(k),
        num_warps=_warps(k),
    )
    return dx, dw, db
