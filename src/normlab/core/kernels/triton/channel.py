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

This module holds the tiling and the launchers; the kernels are in ``channel_forward.py`` and
``channel_backward.py``, the tile arithmetic they share in ``channel_tiles.py``.
"""

from __future__ import annotations

from typing import NamedTuple, cast

import torch

from ._runtime import INTERPRETED, launch, semaphore
from .activation import PRELU_CODE
from .channel_backward import channel_backward_kernel
from .channel_forward import channel_forward_kernel

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


#: ``(running_mean, running_var, num_batches_tracked | None, momentum | None, unbiased)``: the
#: running estimates a BatchNorm launch merges its batch into
RunningUpdate = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, float | None, bool]

#: (stride of N, of C, of the flattened spatial dims) of a tensor the kernels read in place
_Strides = tuple[int, int, int]


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

    def sizes(self) -> tuple[int, int, int, int, int, int, int]:
        """What both kernels take after their pointers, in their order: C, S, R, K, CG, CPP, NCHUNK."""
        return self.c, self.s, self.rows, self.groups, self.channels_per_group, self.channels_per_program, self.chunks


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
        strides = _collapsed_strides(mask.unsqueeze(1))  # contiguous: they collapse
    return mask, cast("_Strides", strides)[0], cast("_Strides", strides)[2]


def _constants(
    tiling: ChannelTiling, given: bool, mask: torch.Tensor | None, weight: object, bias: object, act: int
) -> dict[str, object]:
    """The compile-time constants (and warps) the forward and the backward kernel share."""
    return {
        "PER_SAMPLE": tiling.per_sample,
        "GROUP_MODE": tiling.group_mode,
        "GIVEN": given,
        "HAS_MASK": mask is not None,
        "HAS_W": weight is not None,
        "HAS_B": bias is not None,
        "ACT": act,
        "BLOCK_R": tiling.block_r,
        "BLOCK_C": tiling.block_c,
        "num_warps": 8 if tiling.block_r * tiling.block_c >= 4096 else 4,
    }


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
    update: RunningUpdate | None = None,
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
    # the entries pass tensors whose strides collapse (collapsible), or contiguous copies
    xs, ys = cast("_Strides", _collapsed_strides(x)), cast("_Strides", _collapsed_strides(y))
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
        channel_forward_kernel,
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
        *tiling.sizes(),
        *xs,
        *ys,
        msn,
        mss,
        float(eps),
        float(param),
        momentum,
        **_constants(tiling, given is not None, mask, weight, bias, act),
        UPDATE=update is not None and given is None,
        HAS_COUNTER=counter is not None,
        UNBIASED=bool(unbiased),
        RESIDENT=tiling.resident and given is None,
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
    given: tuple[torch.Tensor, torch.Tensor | None, float] | None = None,
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
        channel_backward_kernel,
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
        *tiling.sizes(),
        *cast("_Strides", _collapsed_strides(dx)),  # fresh, the forward's input, or made contiguous above
        *cast("_Strides", _collapsed_strides(x)),
        *cast("_Strides", _collapsed_strides(dy)),
        msn,
        mss,
        float(eps),
        float(param),
        **_constants(tiling, given is not None, mask, weight, bias, act),
        INPLACE=inplace,
        PARAMS=params,
        RESIDENT=tiling.resident,
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
