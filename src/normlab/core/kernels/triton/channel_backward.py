# mypy: disable-error-code="untyped-decorator,no-untyped-def"
# (every function here is a @triton.jit kernel: triton ships no types, and a kernel's
# parameters are Triton pointers, blocks and constexprs, which no Python annotation describes)
"""The channel family's backward kernel: the closed form from the input (or, in place, from the
output), parameter gradients per channel — summed over samples by the finishing program for
GroupNorm — and the eval form. See ``channel.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .activation import PRELU, act_grad, act_grad_from_output, act_inverse
from .channel_tiles import load_affine, segment_sum, store_tile, tile_offsets, tile_rows, tile_valid


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
def channel_backward_kernel(
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
        w, b, slope = load_affine(w_ptr, b_ptr, slope_ptr, first_cols, col_ok, HAS_W, HAS_B, ACT == PRELU)
        if GIVEN:
            shift = tl.load(rm_ptr + first_cols, mask=col_ok, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt_rn(tl.load(rv_ptr + first_cols, mask=col_ok, other=1.0).to(tl.float32) + eps)
        n_idx, s_idx, row_ok = tile_rows(0, pid_n, S, R, PER_SAMPLE, BLOCK_R)
        ok = tile_valid(mask_ptr, n_idx, s_idx, row_ok, col_ok, msn, mss, HAS_MASK)
        x = tl.load(x_ptr + tile_offsets(n_idx, s_idx, first_cols, xsn, xsc, xss), mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + tile_offsets(n_idx, s_idx, first_cols, gsn, gsc, gss), mask=ok, other=0.0).to(tl.float32)
        xhat_keep, dz_keep, z = _recover(x, dy, shift, offset, rstd, w, b, slope, param, ACT, INPLACE)
        dz_keep = tl.where(ok, dz_keep, 0.0)
        col_dz = tl.sum(dz_keep, 0)
        col_dzx = tl.sum(dz_keep * xhat_keep, 0)
        if ACT == PRELU:
            col_slope = tl.sum(tl.where(ok & ~(z > 0), dy * z, 0.0), 0)
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
            store_tile(
                dx_ptr, dz_keep * w[None, :] * rstd[None, :], n_idx, s_idx, first_cols, row_ok, col_ok, dsn, dsc, dss
            )
    else:
        for chunk in range(0, NCHUNK):
            cols = first_cols + chunk * BLOCK_C
            col_ok = cols < c_hi
            w, b, slope = load_affine(w_ptr, b_ptr, slope_ptr, cols, col_ok, HAS_W, HAS_B, ACT == PRELU)
            if GIVEN:
                shift = tl.load(rm_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
                rstd = 1.0 / tl.sqrt_rn(tl.load(rv_ptr + cols, mask=col_ok, other=1.0).to(tl.float32) + eps)
            acc_dz = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
            acc_dzx = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
            acc_slope = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
            for r0 in range(0, R, BLOCK_R):
                n_idx, s_idx, row_ok = tile_rows(r0, pid_n, S, R, PER_SAMPLE, BLOCK_R)
                ok = tile_valid(mask_ptr, n_idx, s_idx, row_ok, col_ok, msn, mss, HAS_MASK)
                x = tl.load(x_ptr + tile_offsets(n_idx, s_idx, cols, xsn, xsc, xss), mask=ok, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + tile_offsets(n_idx, s_idx, cols, gsn, gsc, gss), mask=ok, other=0.0).to(
                    tl.float32
                )
                xhat, dz, z = _recover(x, dy, shift, offset, rstd, w, b, slope, param, ACT, INPLACE)
                dz = tl.where(ok, dz, 0.0)
                acc_dz += dz
                acc_dzx += dz * xhat
                if ACT == PRELU:
                    acc_slope += tl.where(ok & ~(z > 0), dy * z, 0.0)
                if GIVEN:
                    store_tile(
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
            sum_g = segment_sum(sum_g, CG, GROUP_MODE, BLOCK_C)
            sum_gx = segment_sum(sum_gx, CG, GROUP_MODE, BLOCK_C)
        n = tl.maximum(count, 1.0)
        mean_g = sum_g / n
        mean_gx = sum_gx / n
        if RESIDENT:
            dx = rstd[None, :] * (dz_keep * w[None, :] - mean_g[None, :] - xhat_keep * mean_gx[None, :])
            store_tile(dx_ptr, tl.where(ok, dx, 0.0), n_idx, s_idx, first_cols, row_ok, col_ok, dsn, dsc, dss)
        else:
            for chunk in range(0, NCHUNK):
                cols = first_cols + chunk * BLOCK_C
                col_ok = cols < c_hi
                w, b, slope = load_affine(w_ptr, b_ptr, slope_ptr, cols, col_ok, HAS_W, HAS_B, ACT == PRELU)
                for r0 in range(0, R, BLOCK_R):
                    n_idx, s_idx, row_ok = tile_rows(r0, pid_n, S, R, PER_SAMPLE, BLOCK_R)
                    ok = tile_valid(mask_ptr, n_idx, s_idx, row_ok, col_ok, msn, mss, HAS_MASK)
                    x = tl.load(x_ptr + tile_offsets(n_idx, s_idx, cols, xsn, xsc, xss), mask=ok, other=0.0).to(
                        tl.float32
                    )
                    dy = tl.load(dy_ptr + tile_offsets(n_idx, s_idx, cols, gsn, gsc, gss), mask=ok, other=0.0).to(
                        tl.float32
                    )
                    xhat, dz, z = _recover(x, dy, shift, offset, rstd, w, b, slope, param, ACT, INPLACE)
                    dx = rstd[None, :] * (dz * w[None, :] - mean_g[None, :] - xhat * mean_gx[None, :])
                    store_tile(dx_ptr, tl.where(ok, dx, 0.0), n_idx, s_idx, cols, row_ok, col_ok, dsn, dsc, dss)

    if PARAMS and PER_SAMPLE:
        # the last program to arrive sums the per-sample parts over N
        arrived = tl.atomic_add(sem_ptr, 1, sem="acq_rel")
        if arrived == tl.num_programs(0) * tl.num_programs(1) - 1:
            _sum_over_samples(partial_ptr, dw_ptr, db_ptr, dslope_ptr, N, C, ACT == PRELU, BLOCK_C)
            tl.atomic_xchg(sem_ptr, 0)


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
