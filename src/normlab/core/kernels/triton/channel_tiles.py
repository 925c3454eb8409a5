# mypy: disable-error-code="untyped-decorator,no-untyped-def"
# (every function here is a @triton.jit kernel: triton ships no types, and a kernel's
# parameters are Triton pointers, blocks and constexprs, which no Python annotation describes)
"""The tile arithmetic the channel kernels share: which rows and channels a tile covers, where
they lie in memory, the per-lane moments and their merge, parameters and stores.

A tile is [BLOCK_R, BLOCK_C]: rows are positions — (sample, spatial) for BatchNorm, spatial
within one sample otherwise — and columns are channels. See ``channel.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .activation import cast_to

_FINITE_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def tile_rows(r0, pid_n, S, R, PER_SAMPLE: tl.constexpr, BLOCK_R: tl.constexpr):
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
def tile_offsets(n_idx, s_idx, cols, sn, sc, ss):
    return n_idx[:, None] * sn + s_idx[:, None] * ss + cols.to(tl.int64)[None, :] * sc


@triton.jit
def tile_valid(mask_ptr, n_idx, s_idx, row_ok, col_ok, msn, mss, HAS_MASK: tl.constexpr):
    """In-range elements (and, with a mask, valid positions)."""
    inside = row_ok[:, None] & col_ok[None, :]
    if HAS_MASK:
        m = tl.load(mask_ptr + n_idx * msn + s_idx * mss, mask=row_ok, other=0)
        inside = inside & (m != 0)[:, None]
    return inside


@triton.jit
def segment_sum(v, CG, GROUP_MODE: tl.constexpr, BLOCK_C: tl.constexpr):
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
def lane_accumulate(x, ok, cnt, k, s1, s2):
    """Fold one tile into the per-lane (count, shift, Σd, Σd²)."""
    k = tl.where(ok & (cnt == 0), x, k)
    d = tl.where(ok, x - k, 0.0)
    return cnt + ok.to(tl.float32), k, s1 + d, s2 + d * d


@triton.jit
def merge_lanes(cnt, k, s1, s2, CG, GROUP_MODE: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-lane sums → per-column (group) shift, offset, biased variance and count (Chan)."""
    col_n = segment_sum(tl.sum(cnt, 0), CG, GROUP_MODE, BLOCK_C)
    divisor = tl.maximum(col_n, 1.0)
    # a common shift near the group mean; each lane's shift differs from it exactly (Sterbenz)
    shift = segment_sum(tl.sum(cnt * k, 0), CG, GROUP_MODE, BLOCK_C) / divisor
    lane_mean = s1 / tl.maximum(cnt, 1.0)
    rel = tl.where(cnt > 0, (k - shift[None, :]) + lane_mean, 0.0)  # lane mean − shift
    offset = segment_sum(tl.sum(cnt * rel, 0), CG, GROUP_MODE, BLOCK_C) / divisor
    spread = rel - offset[None, :]
    m2 = segment_sum(tl.sum((s2 - s1 * lane_mean) + cnt * spread * spread, 0), CG, GROUP_MODE, BLOCK_C)
    var = tl.maximum(m2 / divisor, 0.0)  # ≥ 0: a constant group can round to −1 ulp
    return shift, offset, var, col_n


@triton.jit
def load_param(ptr, cols, col_ok, default, HAS: tl.constexpr):
    if HAS:
        return tl.load(ptr + cols, mask=col_ok, other=default).to(tl.float32)
    else:
        return tl.zeros([cols.shape[0]], tl.float32) + default


@triton.jit
def load_affine(
    w_ptr, b_ptr, slope_ptr, cols, col_ok, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SLOPE: tl.constexpr
):
    """γ, β and PReLU's slope of the columns (1, 0 and 0 where there is none): every pass over
    a tile applies all three."""
    w = load_param(w_ptr, cols, col_ok, 1.0, HAS_W)
    b = load_param(b_ptr, cols, col_ok, 0.0, HAS_B)
    slope = load_param(slope_ptr, cols, col_ok, 0.0, HAS_SLOPE)
    return w, b, slope


@triton.jit
def is_finite(v):
    return tl.abs(v) <= _FINITE_MAX


@triton.jit
def store_tile(ptr, values, n_idx, s_idx, cols, row_ok, col_ok, sn, sc, ss):
    tl.store(
        ptr + tile_offsets(n_idx, s_idx, cols, sn, sc, ss),
        cast_to(values, ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )
