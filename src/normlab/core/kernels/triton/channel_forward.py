# mypy: disable-error-code="untyped-decorator,no-untyped-def"
# (every function here is a @triton.jit kernel: triton ships no types, and a kernel's
# parameters are Triton pointers, blocks and constexprs, which no Python annotation describes)
"""The channel family's forward kernel (batch or given statistics, optional mask, fused
activation, output in place or not) and BatchNorm's running-estimate update by the finishing
program. See ``channel.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .activation import PRELU, act_forward, cast_to
from .channel_tiles import (
    is_finite,
    lane_accumulate,
    load_affine,
    merge_lanes,
    store_tile,
    tile_offsets,
    tile_rows,
    tile_valid,
)


@triton.jit
def channel_forward_kernel(
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
        w, b, slope = load_affine(w_ptr, b_ptr, slope_ptr, first_cols, col_ok, HAS_W, HAS_B, ACT == PRELU)
        for r0 in range(0, R, BLOCK_R):
            n_idx, s_idx, row_ok = tile_rows(r0, pid_n, S, R, PER_SAMPLE, BLOCK_R)
            ok = tile_valid(mask_ptr, n_idx, s_idx, row_ok, col_ok, msn, mss, HAS_MASK)
            x = tl.load(x_ptr + tile_offsets(n_idx, s_idx, first_cols, xsn, xsc, xss), mask=ok, other=0.0)
            z = ((x.to(tl.float32) - shift[None, :]) * rstd[None, :]) * w[None, :] + b[None, :]
            y = act_forward(z, param, slope[None, :], ACT)
            if HAS_MASK:
                y = tl.where(ok, y, 0.0)
            store_tile(y_ptr, y, n_idx, s_idx, first_cols, row_ok, col_ok, ysn, ysc, yss)
    else:
        if RESIDENT:  # the whole group in one tile: read once, statistics and output from registers
            col_ok = first_cols < c_hi
            n_idx, s_idx, row_ok = tile_rows(0, pid_n, S, R, PER_SAMPLE, BLOCK_R)
            ok = tile_valid(mask_ptr, n_idx, s_idx, row_ok, col_ok, msn, mss, HAS_MASK)
            x_keep = tl.load(x_ptr + tile_offsets(n_idx, s_idx, first_cols, xsn, xsc, xss), mask=ok, other=0.0)
            zero = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
            cnt, k, s1, s2 = lane_accumulate(x_keep.to(tl.float32), ok, zero, zero, zero, zero)
        else:
            zero = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
            cnt, k, s1, s2 = zero, zero, zero, zero
            for chunk in range(0, NCHUNK):
                cols = first_cols + chunk * BLOCK_C
                col_ok = cols < c_hi
                for r0 in range(0, R, BLOCK_R):
                    n_idx, s_idx, row_ok = tile_rows(r0, pid_n, S, R, PER_SAMPLE, BLOCK_R)
                    ok = tile_valid(mask_ptr, n_idx, s_idx, row_ok, col_ok, msn, mss, HAS_MASK)
                    x = tl.load(x_ptr + tile_offsets(n_idx, s_idx, cols, xsn, xsc, xss), mask=ok, other=0.0)
                    cnt, k, s1, s2 = lane_accumulate(x.to(tl.float32), ok, cnt, k, s1, s2)
        shift, offset, var, count = merge_lanes(cnt, k, s1, s2, CG, GROUP_MODE, BLOCK_C)
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
            w, b, slope = load_affine(w_ptr, b_ptr, slope_ptr, first_cols, col_ok, HAS_W, HAS_B, ACT == PRELU)
            xhat = ((x_keep.to(tl.float32) - shift[None, :]) - offset[None, :]) * rstd[None, :]
            y = act_forward(xhat * w[None, :] + b[None, :], param, slope[None, :], ACT)
            if HAS_MASK:
                y = tl.where(ok, y, 0.0)
            store_tile(y_ptr, y, n_idx, s_idx, first_cols, row_ok, col_ok, ysn, ysc, yss)
        else:
            for chunk in range(0, NCHUNK):
                cols = first_cols + chunk * BLOCK_C
                col_ok = cols < c_hi
                w, b, slope = load_affine(w_ptr, b_ptr, slope_ptr, cols, col_ok, HAS_W, HAS_B, ACT == PRELU)
                for r0 in range(0, R, BLOCK_R):
                    n_idx, s_idx, row_ok = tile_rows(r0, pid_n, S, R, PER_SAMPLE, BLOCK_R)
                    ok = tile_valid(mask_ptr, n_idx, s_idx, row_ok, col_ok, msn, mss, HAS_MASK)
                    x = tl.load(x_ptr + tile_offsets(n_idx, s_idx, cols, xsn, xsc, xss), mask=ok, other=0.0)
                    xhat = ((x.to(tl.float32) - shift[None, :]) - offset[None, :]) * rstd[None, :]
                    y = act_forward(xhat * w[None, :] + b[None, :], param, slope[None, :], ACT)
                    if HAS_MASK:
                        y = tl.where(ok, y, 0.0)
                    store_tile(y_ptr, y, n_idx, s_idx, cols, row_ok, col_ok, ysn, ysc, yss)

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
        finite = is_finite(new_mean) & is_finite(new_var) & is_finite(batch_mean) & is_finite(batch_var)
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
