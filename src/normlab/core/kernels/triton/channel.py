"""The channel family in Triton: BatchNorm, InstanceNorm and GroupNorm — masked or not, with
a fused activation, in place or not — forward and closed-form backward, one launch each.

The input is read as (N, C, S) with S the flattened spatial extent and any strides for which
the spatial dims collapse into one (NCHW-contiguous, channels_last, an (N, C, L) tensor
transposed from (N, L, C)); the output has the input's strides. A *statistics group* is a
channel (BatchNorm: over N and S), or a (sample, group of C/G channels) (GroupNorm; G = C is
InstanceNorm: over S). Each program owns whole groups: a tile of channels — for BatchNorm
across every sample, else within one sample — and loops over their rows (positions) in
[BLOCK_R, BLOCK_C] tiles, so no two programs ever share a group and no reduction crosses
programs except the few per-channel numbers a *finishing program* gathers (below).

Statistics, one pass over the input. Each lane of the tile keeps its own shift — the first
valid value it reads — and sums d = x − shift and d² (exact differences, no E[x²] − E[x]²
cancellation); at the end the lanes merge by Chan's formula about a common group shift, so
the mean is carried as ``shift + offset`` (an exact float32 shift plus a small offset, as the
CPU kernels carry it): on 1e4 ± 0.01 data a float32 mean alone would be off by half an ulp,
5 % of a standard deviation. A group small enough to fit one tile is loaded once and written
from registers (``RESIDENT``): one read and one write instead of two reads and one write.

Finishing program: a kernel whose result needs every program's part — BatchNorm's running
estimates (all channels or none, when a batch is not finite), GroupNorm's per-channel dγ/dβ
summed over samples — counts its programs in on a semaphore (``atomic_add``, acquire-release),
and the last to arrive does that work and resets the semaphore. No host synchronization and no
second launch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._runtime import INTERPRETED, launch, semaphore
from .activation import PRELU, PRELU_CODE, act_forward, act_grad, act_grad_from_output, act_inverse, cast_to

__all__ = ["ChannelTiling", "channel_backward", "channel_forward", "channel_tiling"]

# float32's largest finite value: |v| <= it is False for inf and NaN alike
_FINITE_MAX = tl.constexpr(3.4028234663852886e38)


# --- tiles -------------------------------------------------------------------------------------


@triton.jit
def _rows(r0, pid_n, S, R, PER_SAMPLE: tl.constexpr, BLOCK_R: tl.constexpr):
    """(sample, position) of BLOCK_R rows from r0; rows span (N, S) for BatchNorm, S otherwise."""
    rows = r0 + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    if PER_SAMPLE:
        n_idx = rows * 0 + pid_n
        s_idx = rows
    else:
        n_idx = rows // S
        s_idx = rows % S
    return n_idx.to(tl.int64), s_idx.to(tl.int64), row_ok


@triton.jit
def _offsets(n_idx, s_idx, cols, sn, sc, ss):
    return n_idx[:, None] * sn + s_idx[:, None] * ss + cols.to(tl.int64)[None, :] * sc


@triton.jit
def _valid(mask_ptr, n_idx, s_idx, row_ok, col_ok, msn, mss, HAS_MASK: tl.constexpr):
    """In-range elements (and, with a mask, valid positions)."""
    inside = row_ok[:, None] & col_ok[None, :]
    if HAS_MASK:
        m = tl.load(mask_ptr + n_idx * msn + s_idx * mss, mask=row_ok, other=0)
        inside = inside & (m != 0)[:, None]
    return inside


@triton.jit
def _segment_sum(v, CG, GROUP_MODE: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-column values → each column's group total (GROUP_MODE 0: a group per column;
    1: groups of CG adjacent columns; 2: all columns are one group)."""
    if GROUP_MODE == 0:
        return v
    elif GROUP_MODE == 1:
        gid = tl.arange(0, BLOCK_C) // CG
        same = gid[:, None] == gid[None, :]
        return tl.sum(tl.where(same, v[None, :], 0.0), 1)
    else:
        return tl.zeros_like(v) + tl.sum(v, 0)


@triton.jit
def _lane_accumulate(x, ok, cnt, k, s1, s2):
    """Fold one tile into the per-lane (count, shift, Σd, Σd²)."""
    k = tl.where(ok & (cnt == 0), x, k)
    d = tl.where(ok, x - k, 0.0)
    return cnt + ok.to(tl.float32), k, s1 + d, s2 + d * d


@triton.jit
def _merge_lanes(cnt, k, s1, s2, CG, GROUP_MODE: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-lane sums → per-column (group) shift, offset, biased variance and count (Chan)."""
    col_n = _segment_sum(tl.sum(cnt, 0), CG, GROUP_MODE, BLOCK_C)
    divisor = tl.maximum(col_n, 1.0)
    # a common shift near the group mean; each lane's shift differs from it exactly (Sterbenz)
    shift = _segment_sum(tl.sum(cnt * k, 0), CG, GROUP_MODE, BLOCK_C) / divisor
    lane_mean = s1 / tl.maximum(cnt, 1.0)
    rel = tl.where(cnt > 0, (k - shift[None, :]) + lane_mean, 0.0)  # lane mean − shift
    offset = _segment_sum(tl.sum(cnt * rel, 0), CG, GROUP_MODE, BLOCK_C) / divisor
    spread = rel - offset[None, :]
    m2 = _segment_sum(tl.sum((s2 - s1 * lane_mean) + cnt * spread * spread, 0), CG, GROUP_MODE, BLOCK_C)
    var = tl.maximum(m2 / divisor, 0.0)  # ≥ 0: a constant group can round to −1 ulp
    return shift, offset, var, col_n


@triton.jit
def _param(ptr, cols, col_ok, default, HAS: tl.constexpr):
    if HAS:
        return tl.load(ptr + cols, mask=col_ok, other=default).to(tl.float32)
    else:
        return tl.zeros([cols.shape[0]], tl.float32) + default


@triton.jit
def _is_finite(v):
    return tl.abs(v) <= _FINITE_MAX


# --- forward -----------------------------------------------------------------------------------


@triton.jit
def _channel_forward_kernel(
    x_ptr,
    y_ptr,
    mask_ptr,
    w_ptr,
    b_ptr,
    slope_ptr,
    stats_ptr,  # (5, K) float32: shift, offset, rstd, biased var, count per group
    rm_ptr,  # running mean: given statistics (GIVEN) or the estimate to update (UPDATE)
    rv_ptr,
    counter_ptr,  # num_batches_tracked (int64) when UPDATE with one
    status_ptr,  # int32: 1 merged, 0 not finite (left untouched), 2 fewer than 2 valid values
    sem_ptr,
    C,
    S,
    R,
    K,
    CG,
    CPP,
    NCHUNK,
    xsn,
    xsc,
    xss,
    ysn,
    ysc,
    yss,
    msn,
    mss,
    eps,
    param,
    momentum,  # < 0: cumulative average (1 / (num_batches_tracked + 1))
    PER_SAMPLE: tl.constexpr,
    GROUP_MODE: tl.constexpr,
    GIVEN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,
    UPDATE: tl.constexpr,
    HAS_COUNTER: tl.constexpr,
    UNBIASED: tl.constexpr,
    RESIDENT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    c0 = pid_t * CPP
    c_hi = tl.minimum(c0 + CPP, C)
    first_cols = c0 + tl.arange(0, BLOCK_C)
    if GIVEN:  # eval BatchNorm: per-channel statistics given, one pointwise pass
        col_ok = first_cols < c_hi
        shift = tl.load(rm_ptr + first_cols, mask=col_ok, other=0.0).to(tl.float32)
        offset = tl.zeros([BLOCK_C], tl.float32)
        rstd = 1.0 / tl.sqrt_rn(tl.load(rv_ptr + first_cols, mask=col_ok, other=1.0).to(tl.float32) + eps)
        w = _param(w_ptr, first_cols, col_ok, 1.0, HAS_W)
        b = _param(b_ptr, first_cols, col_ok, 0.0, HAS_B)
        slope = _param(slope_ptr, first_cols, col_ok, 0.0, ACT == PRELU)
        for r0 in range(0, R, BLOCK_R):
            n_idx, s_idx, row_ok = _rows(r0, pid_n, S, R, PER_SAMPLE, BLOCK_R)
            ok = _valid(mask_ptr, n_idx, s_idx, row_ok, col_ok, msn, mss, HAS_MASK)
            x = tl.load(x_ptr + _offsets(n_idx, s_idx, first_cols, xsn, xsc, xss), mask=ok, other=0.0)
            z = ((x.to(tl.float32) - shift[None, :]) * rstd[None, :]) * w[None, :] + b[None, :]
            y = act_forward(z, param, slope[None, :], ACT)
            if HAS_MASK:
                y = tl.where(ok, y, 0.0)
            store_ok = row_ok[:, None] & col_ok[None, :]
            tl.store(
                y_ptr + _offsets(n_idx, s_idx, first_cols, ysn, ysc, yss),
                cast_to(y, y_ptr.dtype.element_ty),
                mask=store_ok,
            )
    else:
        if RESIDENT:  # the whole group in one tile: read once, statistics and output from registers
            col_ok = first_cols < c_hi
            n_idx, s_idx, row_ok = _rows(0, pid_n, S, R, PER_SAMPLE, BLOCK_R)
            ok = _valid(mask_ptr, n_idx, s_idx, row_ok, col_ok, msn, mss, HAS_MASK)
            x_keep = tl.load(x_ptr + _offsets(n_idx, s_idx, first_cols, xsn, xsc, xss), mask=ok, other=0.0)
            zero = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
            cnt, k, s1, s2 = _lane_accumulate(x_keep.to(tl.float32), ok, zero, zero, zero, zero)
        else:
            zero = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
            cnt, k, s1, s2 = zero, zero, zero, zero
            for chunk in range(0, NCHUNK):
                cols = first_cols + chunk * BLOCK_C
                col_ok = cols < c_hi
                for r0 in range(0, R, BLOCK_R):
                    n_idx, s_idx, row_ok = _rows(r0, pid_n, S, R, PER_SAMPLE, BLOCK_R)
                    ok = _valid(mask_ptr, n_idx, s_idx, row_ok, col_ok, msn, mss, HAS_MASK)
                    x = tl.load(x_ptr + _offsets(n_idx, s_idx, cols, xsn, xsc, xss), mask=ok, other=0.0)
                    cnt, k, s1, s2 = _lane_accumulate(x.to(tl.float32), ok, cnt, k, s1, s2)
        shift, offset, var, count = _merge_lanes(cnt, k, s1, s2, CG, GROUP_MODE, BLOCK_C)
        rstd = 1.0 / tl.sqrt_rn(var + eps)

        # one statistic per group, stored by the group's first column
        local = tl.arange(0, BLOCK_C)
        if GROUP_MODE == 2:
            lead = local == 0
        else:
            lead = ((first_cols % CG) == 0) & (first_cols < c_hi)
        if PER_SAMPLE:
            index = pid_n * (C // CG) + first_cols // CG
        else:
            index = first_cols
        tl.store(stats_ptr + index, shift, mask=lead)
        tl.store(stats_ptr + K + index, offset, mask=lead)
        tl.store(stats_ptr + 2 * K + index, rstd, mask=lead)
        tl.store(stats_ptr + 3 * K + index, var, mask=lead)
        tl.store(stats_ptr + 4 * K + index, count, mask=lead)

        if RESIDENT:
            col_ok = first_cols < c_hi
            w = _param(w_ptr, first_cols, col_ok, 1.0, HAS_W)
            b = _param(b_ptr, first_cols, col_ok, 0.0, HAS_B)
            slope = _param(slope_ptr, first_cols, col_ok, 0.0, ACT == PRELU)
            xhat = ((x_keep.to(tl.float32) - shift[None, :]) - offset[None, :]) * rstd[None, :]
            y = act_forward(xhat * w[None, :] + b[None, :], param, slope[None, :], ACT)
            if HAS_MASK:
                y = tl.where(ok, y, 0.0)
            store_ok = row_ok[:, None] & col_ok[None, :]
            tl.store(
                y_ptr + _offsets(n_idx, s_idx, first_cols, ysn, ysc, yss),
                cast_to(y, y_ptr.dtype.element_ty),
                mask=store_ok,
            )
        else:
            for chunk in range(0, NCHUNK):
                cols = first_cols + chunk * BLOCK_C
                col_ok = cols < c_hi
                w = _param(w_ptr, cols, col_ok, 1.0, HAS_W)
                b = _param(b_ptr, cols, col_ok, 0.0, HAS_B)
                slope = _param(slope_ptr, cols, col_ok, 0.0, ACT == PRELU)
                for r0 in range(0, R, BLOCK_R):
                    n_idx, s_idx, row_ok = _rows(r0, pid_n, S, R, PER_SAMPLE, BLOCK_R)
                    ok = _valid(mask_ptr, n_idx, s_idx, row_ok, col_ok, msn, mss, HAS_MASK)
                    x = tl.load(x_ptr + _offsets(n_idx, s_idx, cols, xsn, xsc, xss), mask=ok, other=0.0)
                    xhat = ((x.to(tl.float32) - shift[None, :]) - offset[None, :]) * rstd[None, :]
                    y = act_forward(xhat * w[None, :] + b[None, :], param, slope[None, :], ACT)
                    if HAS_MASK:
                        y = tl.where(ok, y, 0.0)
                    store_ok = row_ok[:, None] & col_ok[None, :]
                    tl.store(
                        y_ptr + _offsets(n_idx, s_idx, cols, ysn, ysc, yss),
                        cast_to(y, y_ptr.dtype.element_ty),
                        mask=store_ok,
                    )

        if UPDATE:
            # the last program to arrive merges every channel's statistics into the running estimates
            arrived = tl.atomic_add(sem_ptr, 1, sem="acq_rel")
            if arrived == tl.num_programs(0) * tl.num_programs(1) - 1:
                _running_update(
                    stats_ptr, rm_ptr, rv_ptr, counter_ptr, status_ptr, C, momentum, HAS_COUNTER, UNBIASED, BLOCK_C
                )
                tl.atomic_xchg(sem_ptr, 0)


@triton.jit
def _running_update(
    stats_ptr,
    rm_ptr,
    rv_ptr,
    counter_ptr,
    status_ptr,
    C,
    momentum,
    HAS_COUNTER: tl.constexpr,
    UNBIASED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """running = (1 − m)·running + m·batch for every channel, or for none: a batch whose
    statistics (or the updated estimates, in their own dtype) are not finite, or that has
    fewer than 2 valid values (masked), leaves the estimates and the counter untouched."""
    if momentum < 0:
        m = 1.0 / (tl.load(counter_ptr).to(tl.float32) + 1.0)
    else:
        m = momentum
    count = tl.load(stats_ptr + 4 * C, volatile=True)  # one count for every channel
    bad = 0
    for c0 in range(0, C, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = cols < C
        new_mean, new_var, batch_mean, batch_var = _running_values(
            stats_ptr, rm_ptr, rv_ptr, cols, ok, C, count, m, UNBIASED
        )
        finite = _is_finite(new_mean) & _is_finite(new_var) & _is_finite(batch_mean) & _is_finite(batch_var)
        bad += tl.sum(tl.where(ok & ~finite, 1, 0), 0)
    if count < 2.0:
        tl.store(status_ptr, 2)
    elif bad > 0:
        tl.store(status_ptr, 0)
    else:
        for c0 in range(0, C, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            ok = cols < C
            new_mean, new_var, _, _ = _running_values(stats_ptr, rm_ptr, rv_ptr, cols, ok, C, count, m, UNBIASED)
            tl.store(rm_ptr + cols, cast_to(new_mean, rm_ptr.dtype.element_ty), mask=ok)
            tl.store(rv_ptr + cols, cast_to(new_var, rv_ptr.dtype.element_ty), mask=ok)
        if HAS_COUNTER:
            tl.store(counter_ptr, tl.load(counter_ptr) + 1)
        tl.store(status_ptr, 1)


@triton.jit
def _running_values(stats_ptr, rm_ptr, rv_ptr, cols, ok, C, count, m, UNBIASED: tl.constexpr):
    shift = tl.load(stats_ptr + cols, mask=ok, other=0.0, volatile=True)
    offset = tl.load(stats_ptr + C + cols, mask=ok, other=0.0, volatile=True)
    var = tl.load(stats_ptr + 3 * C + cols, mask=ok, other=0.0, volatile=True)
    batch_mean = shift + offset
    if UNBIASED:
        batch_var = tl.where(count > 1.0, var * (count / tl.maximum(count - 1.0, 1.0)), var)
    else:
        batch_var = var
    rm = tl.load(rm_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    rv = tl.load(rv_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    # rounded to the buffers' dtype before the finiteness check: a float16 estimate can overflow
    new_mean = cast_to(rm * (1.0 - m) + batch_mean * m, rm_ptr.dtype.element_ty).to(tl.float32)
    new_var = cast_to(rv * (1.0 - m) + batch_var * m, rv_ptr.dtype.element_ty).to(tl.float32)
    return new_mean, new_var, batch_mean, batch_var


# --- backward ----------------------------------------------------------------------------------


@triton.jit
def _recover(x, dy, shift, offset, rstd, w, b, slope, param, ACT: tl.constexpr, INPLACE: tl.constexpr):
    """(x̂, dz = dy·act'(z), z) from the kept tensor: the input, or the output (in place)."""
    if INPLACE:
        z = act_inverse(x, param, ACT)
        safe = tl.where(tl.abs(w) < 1e-5, tl.where(w < 0, -1e-5, 1e-5), w)
        xhat = (z - b[None, :]) / safe[None, :]
        dz = dy * act_grad_from_output(x, param, ACT)
    else:
        xhat = ((x - shift[None, :]) - offset[None, :]) * rstd[None, :]
        z = xhat * w[None, :] + b[None, :]
        dz = dy * act_grad(z, param, slope[None, :], ACT)
    return xhat, dz, z


@triton.jit
def _channel_backward_kernel(
    dy_ptr,
    x_ptr,  # the input, or the output in the in-place mode
    dx_ptr,
    mask_ptr,
    w_ptr,
    b_ptr,
    slope_ptr,
    stats_ptr,  # the forward's (5, K) statistics; unused with GIVEN
    rm_ptr,
    rv_ptr,
    dw_ptr,  # (C,) float32 each
    db_ptr,
    dslope_ptr,
    partial_ptr,  # (3, N, C) float32: per-sample parameter-gradient parts (PER_SAMPLE)
    sem_ptr,
    N,
    C,
    S,
    R,
    K,
    CG,
    CPP,
    NCHUNK,
    dsn,
    dsc,
    dss,
    xsn,
    xsc,
    xss,
    gsn,
    gsc,
    gss,
    msn,
    mss,
    eps,
    param,
    PER_SAMPLE: tl.constexpr,
    GROUP_MODE: tl.constexpr,
    GIVEN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,
    INPLACE: tl.constexpr,
    PARAMS: tl.constexpr,
    RESIDENT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    c0 = pid_t * CPP
    c_hi = tl.minimum(c0 + CPP, C)
    first_cols = c0 + tl.arange(0, BLOCK_C)
    if GIVEN:
        shift = tl.zeros([BLOCK_C], tl.float32)
        offset = tl.zeros([BLOCK_C], tl.float32)
        rstd = tl.zeros([BLOCK_C], tl.float32)
        count = tl.zeros([BLOCK_C], tl.float32)
    else:
        if GROUP_MODE == 2:  # one group: every column reads its statistics
            index = tl.zeros([BLOCK_C], tl.int32) + pid_n * (C // CG) + c0 // CG
            stat_ok = first_cols >= 0
        else:
            if PER_SAMPLE:
                index = pid_n * (C // CG) + first_cols // CG
            else:
                index = first_cols
            stat_ok = first_cols < c_hi
        shift = tl.load(stats_ptr + index, mask=stat_ok, other=0.0)
        offset = tl.load(stats_ptr + K + index, mask=stat_ok, other=0.0)
        rstd = tl.load(stats_ptr + 2 * K + index, mask=stat_ok, other=0.0)
        count = tl.load(stats_ptr + 4 * K + index, mask=stat_ok, other=1.0)

    # pass 1, chunk by chunk: per-column Σdz, Σdz·x̂ (dβ, dγ) and PReLU's Σdy·z over z ≤ 0, and
    # the γ-weighted sums over the group that dx needs; with given statistics dx right away
    sum_g = tl.zeros([BLOCK_C], tl.float32)
    sum_gx = tl.zeros([BLOCK_C], tl.float32)
    if RESIDENT:
        col_ok = first_cols < c_hi
        w = _param(w_ptr, first_cols, col_ok, 1.0, HAS_W)
        b = _param(b_ptr, first_cols, col_ok, 0.0, HAS_B)
        slope = _param(slope_ptr, first_cols, col_ok, 0.0, ACT == PRELU)
        if GIVEN:
            shift = tl.load(rm_ptr + first_cols, mask=col_ok, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt_rn(tl.load(rv_ptr + first_cols, mask=col_ok, other=1.0).to(tl.float32) + eps)
        n_idx, s_idx, row_ok = _rows(0, pid_n, S, R, PER_SAMPLE, BLOCK_R)
        ok = _valid(mask_ptr, n_idx, s_idx, row_ok, col_ok, msn, mss, HAS_MASK)
        x = tl.load(x_ptr + _offsets(n_idx, s_idx, first_cols, xsn, xsc, xss), mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + _offsets(n_idx, s_idx, first_cols, gsn, gsc, gss), mask=ok, other=0.0).to(tl.float32)
        xhat_keep, dz_keep, z = _recover(x, dy, shift, offset, rstd, w, b, slope, param, ACT, INPLACE)
        dz_keep = tl.where(ok, dz_keep, 0.0)
        col_dz = tl.sum(dz_keep, 0)
        col_dzx = tl.sum(dz_keep * xhat_keep, 0)
        if ACT == PRELU:
            col_slope = tl.sum(tl.where(ok & (z <= 0), dy * z, 0.0), 0)
        else:
            col_slope = col_dz * 0.0
        if PARAMS:
            _store_param_grads(
                dw_ptr,
                db_ptr,
                dslope_ptr,
                partial_ptr,
                first_cols,
                col_ok,
                pid_n,
                N,
                C,
                col_dz,
                col_dzx,
                col_slope,
                PER_SAMPLE,
                ACT == PRELU,
            )
        sum_g += col_dz * w
        sum_gx += col_dzx * w
        if GIVEN:
            _store_tile(
                dx_ptr, dz_keep * w[None, :] * rstd[None, :], n_idx, s_idx, first_cols, row_ok, col_ok, dsn, dsc, dss
            )
    else:
        for chunk in range(0, NCHUNK):
            cols = first_cols + chunk * BLOCK_C
            col_ok = cols < c_hi
            w = _param(w_ptr, cols, col_ok, 1.0, HAS_W)
            b = _param(b_ptr, cols, col_ok, 0.0, HAS_B)
            slope = _param(slope_ptr, cols, col_ok, 0.0, ACT == PRELU)
            if GIVEN:
                shift = tl.load(rm_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
                rstd = 1.0 / tl.sqrt_rn(tl.load(rv_ptr + cols, mask=col_ok, other=1.0).to(tl.float32) + eps)
            acc_dz = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
            acc_dzx = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
            acc_slope = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
            for r0 in range(0, R, BLOCK_R):
                n_idx, s_idx, row_ok = _rows(r0, pid_n, S, R, PER_SAMPLE, BLOCK_R)
                ok = _valid(mask_ptr, n_idx, s_idx, row_ok, col_ok, msn, mss, HAS_MASK)
                x = tl.load(x_ptr + _offsets(n_idx, s_idx, cols, xsn, xsc, xss), mask=ok, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + _offsets(n_idx, s_idx, cols, gsn, gsc, gss), mask=ok, other=0.0).to(tl.float32)
                xhat, dz, z = _recover(x, dy, shift, offset, rstd, w, b, slope, param, ACT, INPLACE)
                dz = tl.where(ok, dz, 0.0)
                acc_dz += dz
                acc_dzx += dz * xhat
                if ACT == PRELU:
                    acc_slope += tl.where(ok & (z <= 0), dy * z, 0.0)
                if GIVEN:
                    _store_tile(
                        dx_ptr, dz * w[None, :] * rstd[None, :], n_idx, s_idx, cols, row_ok, col_ok, dsn, dsc, dss
                    )
            col_dz = tl.sum(acc_dz, 0)
            col_dzx = tl.sum(acc_dzx, 0)
            if PARAMS:
                _store_param_grads(
                    dw_ptr,
                    db_ptr,
                    dslope_ptr,
                    partial_ptr,
                    cols,
                    col_ok,
                    pid_n,
                    N,
                    C,
                    col_dz,
                    col_dzx,
                    tl.sum(acc_slope, 0),
                    PER_SAMPLE,
                    ACT == PRELU,
                )
            sum_g += col_dz * w
            sum_gx += col_dzx * w

    if not GIVEN:
        # pass 2: dx = rstd·(γ·dz − Σγ·dz/n − x̂·Σγ·dz·x̂/n), the sums over the group
        if GROUP_MODE == 2:
            sum_g = tl.zeros([BLOCK_C], tl.float32) + tl.sum(sum_g, 0)
            sum_gx = tl.zeros([BLOCK_C], tl.float32) + tl.sum(sum_gx, 0)
        else:
            sum_g = _segment_sum(sum_g, CG, GROUP_MODE, BLOCK_C)
            sum_gx = _segment_sum(sum_gx, CG, GROUP_MODE, BLOCK_C)
        n = tl.maximum(count, 1.0)
        mean_g = sum_g / n
        mean_gx = sum_gx / n
        if RESIDENT:
            dx = rstd[None, :] * (dz_keep * w[None, :] - mean_g[None, :] - xhat_keep * mean_gx[None, :])
            _store_tile(dx_ptr, tl.where(ok, dx, 0.0), n_idx, s_idx, first_cols, row_ok, col_ok, dsn, dsc, dss)
        else:
            for chunk in range(0, NCHUNK):
                cols = first_cols + chunk * BLOCK_C
                col_ok = cols < c_hi
                w = _param(w_ptr, cols, col_ok, 1.0, HAS_W)
                b = _param(b_ptr, cols, col_ok, 0.0, HAS_B)
                slope = _param(slope_ptr, cols, col_ok, 0.0, ACT == PRELU)
                for r0 in range(0, R, BLOCK_R):
                    n_idx, s_idx, row_ok = _rows(r0, pid_n, S, R, PER_SAMPLE, BLOCK_R)
                    ok = _valid(mask_ptr, n_idx, s_idx, row_ok, col_ok, msn, mss, HAS_MASK)
                    x = tl.load(x_ptr + _offsets(n_idx, s_idx, cols, xsn, xsc, xss), mask=ok, other=0.0).to(tl.float32)
                    dy = tl.load(dy_ptr + _offsets(n_idx, s_idx, cols, gsn, gsc, gss), mask=ok, other=0.0).to(
                        tl.float32
                    )
                    xhat, dz, z = _recover(x, dy, shift, offset, rstd, w, b, slope, param, ACT, INPLACE)
                    dx = rstd[None, :] * (dz * w[None, :] - mean_g[None, :] - xhat * mean_gx[None, :])
                    _store_tile(dx_ptr, tl.where(ok, dx, 0.0), n_idx, s_idx, cols, row_ok, col_ok, dsn, dsc, dss)

    if PARAMS and PER_SAMPLE:
        # the last program to arrive sums the per-sample parts over N
        arrived = tl.atomic_add(sem_ptr, 1, sem="acq_rel")
        if arrived == tl.num_programs(0) * tl.num_programs(1) - 1:
            _sum_over_samples(partial_ptr, dw_ptr, db_ptr, dslope_ptr, N, C, ACT == PRELU, BLOCK_C)
            tl.atomic_xchg(sem_ptr, 0)


@triton.jit
def _store_tile(ptr, values, n_idx, s_idx, cols, row_ok, col_ok, sn, sc, ss):
    tl.store(
        ptr + _offsets(n_idx, s_idx, cols, sn, sc, ss),
        cast_to(values, ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def _store_param_grads(
    dw_ptr,
    db_ptr,
    dslope_ptr,
    partial_ptr,
    cols,
    col_ok,
    pid_n,
    N,
    C,
    col_dz,
    col_dzx,
    col_slope,
    PER_SAMPLE: tl.constexpr,
    SLOPE: tl.constexpr,
):
    if PER_SAMPLE:
        base = partial_ptr + pid_n * C + cols
        tl.store(base, col_dzx, mask=col_ok)
        tl.store(base + N * C, col_dz, mask=col_ok)
        if SLOPE:
            tl.store(base + 2 * N * C, col_slope, mask=col_ok)
    else:
        tl.store(dw_ptr + cols, col_dzx, mask=col_ok)
        tl.store(db_ptr + cols, col_dz, mask=col_ok)
        if SLOPE:
            tl.store(dslope_ptr + cols, col_slope, mask=col_ok)


@triton.jit
def _sum_over_samples(partial_ptr, dw_ptr, db_ptr, dslope_ptr, N, C, SLOPE: tl.constexpr, BLOCK: tl.constexpr):
    for c0 in range(0, C, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = cols < C
        total_w = tl.zeros([BLOCK], tl.float32)
        total_b = tl.zeros([BLOCK], tl.float32)
        total_s = tl.zeros([BLOCK], tl.float32)
        for n in range(0, N):
            base = partial_ptr + n * C + cols
            total_w += tl.load(base, mask=ok, other=0.0, volatile=True)
            total_b += tl.load(base + N * C, mask=ok, other=0.0, volatile=True)
            if SLOPE:
                total_s += tl.load(base + 2 * N * C, mask=ok, other=0.0, volatile=True)
        tl.store(dw_ptr + cols, total_w, mask=ok)
        tl.store(db_ptr + cols, total_b, mask=ok)
        if SLOPE:
            tl.store(dslope_ptr + cols, total_s, mask=ok)


# --- launchers ---------------------------------------------------------------------------------

#: elements per tile when a group is streamed: BLOCK_R · BLOCK_C, and the most elements a
#: program keeps in registers when its groups fit (one read of x, or of x and dy, per call) —
#: tuning choices for GPUs, untested there; tests lower them to drive the streaming path
TILE_ELEMENTS = 4096
RESIDENT_ELEMENTS = 8192
#: channels per tile when channels are contiguous (channels_last), and NCHW planes per tile for
#: GroupNorm/InstanceNorm (whole groups, so a group that fits is read once)
COLUMN_CHANNELS = 16
PLANE_CHANNELS = 16
#: fewest channels per channels_last tile (16 contiguous bytes of float32 per row)
MIN_COLUMN_CHANNELS = 4
#: NCHW planes per tile for BatchNorm: one on a GPU, so that every channel is a program of its
#: own (a BatchNorm channel spans the batch, and programs are the only parallelism); more under
#: the interpreter, where a program costs milliseconds of Python
BATCH_PLANE_CHANNELS = 16 if INTERPRETED else 1


class ChannelTiling(NamedTuple):
    """How a channel-family call maps onto programs and tiles."""

    n: int
    c: int
    s: int
    rows: int  # R: positions per statistics group and channel (N·S for BatchNorm, S otherwise)
    groups: int  # statistics groups K: C (BatchNorm) or N·G
    per_sample: bool
    group_mode: int  # 0: a channel per group; 1: several whole groups per tile; 2: one group in chunks
    channels_per_group: int
    channels_per_program: int
    chunks: int
    block_r: int
    block_c: int
    resident: bool
    grid: tuple[int, int]


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def channel_tiling(shape: tuple[int, ...], channels_contiguous: bool, groups: int) -> ChannelTiling:
    """The tiling of an (N, C, *spatial) input: BatchNorm for ``groups < 0``, else GroupNorm."""
    n, c = shape[0], shape[1]
    s = 1
    for d in shape[2:]:
        s *= d
    per_sample = groups > 0
    cg = c // groups if per_sample else 1
    rows = s if per_sample else n * s
    if channels_contiguous:
        max_c = COLUMN_CHANNELS
    else:
        max_c = PLANE_CHANNELS if per_sample else BATCH_PLANE_CHANNELS
    if cg == 1:
        mode, block_c = 0, min(_pow2(c), max_c)
        # channels_last: fewer channels per tile where that keeps whole channels in registers
        while channels_contiguous and block_c > MIN_COLUMN_CHANNELS and _pow2(rows) * block_c > RESIDENT_ELEMENTS:
            block_c //= 2
        cpp, chunks = block_c, 1
    elif cg <= max_c:
        mode = 1
        cpp = (max_c // cg) * cg
        block_c, chunks = _pow2(cpp), 1
    else:
        mode, block_c = 2, max_c
        cpp, chunks = cg, -(-cg // max_c)
    resident = chunks == 1 and _pow2(rows) * block_c <= RESIDENT_ELEMENTS
    block_r = _pow2(rows) if resident else _pow2(max(1, TILE_ELEMENTS // block_c))
    k = n * groups if per_sample else c
    return ChannelTiling(
        n,
        c,
        s,
        rows,
        k,
        per_sample,
        mode,
        cg,
        cpp,
        chunks,
        block_r,
        block_c,
        resident,
        (-(-c // cpp), n if per_sample else 1),
    )


def _collapsed_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(stride of N, of C, of the flattened spatial dims), or None when the spatial dims do
    not collapse into one stride."""
    sizes, strides = t.shape[2:], t.stride()[2:]
    step = None
    expected = None
    for size, stride in reversed(list(zip(sizes, strides))):
        if size == 1:
            continue
        if step is None:
            step, expected = stride, stride * size
        elif stride != expected:
            return None
        else:
            expected = stride * size
    return t.stride(0), t.stride(1), (1 if step is None else step)


def collapsible(t: torch.Tensor) -> bool:
    """Whether the kernels read ``t`` in place (else the caller passes a contiguous copy)."""
    return t.dim() >= 2 and _collapsed_strides(t) is not None


def _mask_strides(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, int, int]:
    """The (N, *spatial) bool mask and (stride of N, stride of the flattened positions). Passed
    as it is (not a reshaped view: to a tracer, a view of an input that a kernel might write is
    written back into that input); copied only where its spatial strides do not collapse."""
    if mask is None:
        return None, 0, 0
    strides = _collapsed_strides(mask.unsqueeze(1))  # the position dims of an (N, 1, *spatial) view
    if strides is None:
        mask = mask.contiguous()
        strides = _collapsed_strides(mask.unsqueeze(1))
    return mask, strides[0], strides[2]


def _warps(tiling: ChannelTiling) -> int:
    return 8 if tiling.block_r * tiling.block_c >= 4096 else 4


def channel_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    prelu_weight: torch.Tensor | None,
    mask: torch.Tensor | None,
    groups: int,
    eps: float,
    act: int,
    param: float,
    *,
    out: torch.Tensor | None = None,
    given: tuple[torch.Tensor, torch.Tensor] | None = None,
    update: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch: ``(y, stats, status)``.

    ``y = act(γ·x̂ + β)`` (0 at masked positions), written into ``out`` when given (the
    in-place mode passes ``x``). ``given = (mean, var)``: BatchNorm with those statistics
    (eval); ``stats`` is then empty. Otherwise ``stats`` is (5, K) float32 — shift, offset,
    rstd, biased variance and valid count per statistics group. ``update = (running_mean,
    running_var, num_batches_tracked | None, momentum | None, unbiased)`` merges a BatchNorm
    batch into the running estimates inside the launch; ``status`` (int32) then says 1
    merged, 0 skipped (not finite), 2 skipped (fewer than 2 valid values)."""
    tiling = channel_tiling(tuple(x.shape), x.dim() > 2 and x.stride(1) == 1 or x.dim() == 2, groups)
    y = torch.empty_like(x) if out is None else out
    xs, ys = _collapsed_strides(x), _collapsed_strides(y)
    mask_bytes, msn, mss = _mask_strides(mask)
    slope = _slope(prelu_weight, act, x.shape[1])
    status = torch.empty(1, dtype=torch.int32, device=x.device)
    stats = torch.empty((5, 0 if given is not None else tiling.groups), dtype=torch.float32, device=x.device)
    rm = rv = counter = None
    momentum, unbiased = 0.0, True
    if given is not None:
        rm, rv = given
    elif update is not None:
        rm, rv, counter, mom, unbiased = update
        momentum = -1.0 if mom is None else float(mom)
    launch(
        _channel_forward_kernel,
        tiling.grid,
        x,
        y,
        _or(mask_bytes, x),
        _or(weight, x),
        _or(bias, x),
        _or(slope, x),
        stats,
        _or(rm, stats),
        _or(rv, stats),
        _or(counter, status),
        status,
        semaphore(x),
        tiling.c,
        tiling.s,
        tiling.rows,
        tiling.groups,
        tiling.channels_per_group,
        tiling.channels_per_program,
        tiling.chunks,
        *xs,
        *ys,
        msn,
        mss,
        float(eps),
        float(param),
        momentum,
        PER_SAMPLE=tiling.per_sample,
        GROUP_MODE=tiling.group_mode,
        GIVEN=given is not None,
        HAS_MASK=mask is not None,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        ACT=act,
        UPDATE=update is not None and given is None,
        HAS_COUNTER=counter is not None,
        UNBIASED=bool(unbiased),
        RESIDENT=tiling.resident and given is None,
        BLOCK_R=tiling.block_r,
        BLOCK_C=tiling.block_c,
        num_warps=_warps(tiling),
    )
    return y, stats, status


def channel_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    prelu_weight: torch.Tensor | None,
    mask: torch.Tensor | None,
    stats: torch.Tensor,
    groups: int,
    act: int,
    param: float,
    *,
    given: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    inplace: bool = False,
    params: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch: ``(dx, dγ, dβ, dPReLU)`` of :func:`channel_forward`, the parameter
    gradients float32 (C,) (left empty when ``params`` is False). ``x`` is the forward's
    input — or, ``inplace``, its output, from which x̂ is recovered. ``given = (mean, var,
    eps)`` for the eval form."""
    tiling = channel_tiling(tuple(x.shape), x.dim() > 2 and x.stride(1) == 1 or x.dim() == 2, groups)
    if _collapsed_strides(dy) is None:
        dy = dy.contiguous()
    dx = torch.empty_like(x)
    c = x.shape[1]
    dw, db, dslope = (torch.empty(c if params else 0, dtype=torch.float32, device=x.device) for _ in range(3))
    partial = torch.empty(
        (3, x.shape[0], c) if params and tiling.per_sample else (0,), dtype=torch.float32, device=x.device
    )
    mask_bytes, msn, mss = _mask_strides(mask)
    slope = _slope(prelu_weight, act, c)
    rm, rv, eps = given if given is not None else (None, None, 0.0)
    launch(
        _channel_backward_kernel,
        tiling.grid,
        dy,
        x,
        dx,
        _or(mask_bytes, x),
        _or(weight, x),
        _or(bias, x),
        _or(slope, x),
        _or(stats if given is None else None, dx),
        _or(rm, dx),
        _or(rv, dx),
        dw if params else dx,
        db if params else dx,
        dslope if params else dx,
        partial if params and tiling.per_sample else dx,
        semaphore(x),
        tiling.n,
        tiling.c,
        tiling.s,
        tiling.rows,
        tiling.groups,
        tiling.channels_per_group,
        tiling.channels_per_program,
        tiling.chunks,
        *_collapsed_strides(dx),
        *_collapsed_strides(x),
        *_collapsed_strides(dy),
        msn,
        mss,
        float(eps),
        float(param),
        PER_SAMPLE=tiling.per_sample,
        GROUP_MODE=tiling.group_mode,
        GIVEN=given is not None,
        HAS_MASK=mask is not None,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        ACT=act,
        INPLACE=inplace,
        PARAMS=params,
        RESIDENT=tiling.resident,
        BLOCK_R=tiling.block_r,
        BLOCK_C=tiling.block_c,
        num_warps=_warps(tiling),
    )
    return dx, dw, db, dslope


def _or(t: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    # a pointer argument the kernel never reads (its constexpr flag is off) still needs a tensor
    return placeholder if t is None else t


def _slope(prelu_weight: torch.Tensor | None, act: int, channels: int) -> torch.Tensor | None:
    """PReLU's slopes, one per channel: the parameter itself, or a copy spread over the channels."""
    if act != PRELU_CODE or prelu_weight is None:
        return None
    if prelu_weight.numel() == channels and prelu_weight.dim() == 1 and prelu_weight.is_contiguous():
        return prelu_weight
    return prelu_weight.reshape(-1).expand(channels).contiguous()
