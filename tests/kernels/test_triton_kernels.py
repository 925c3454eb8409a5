"""The Triton kernels (normlab.core.kernels.triton) against the float64 NumPy reference and
torch.nn — on CPU tensors under Triton's interpreter where there is no GPU (tests/conftest.py
turns it on), on CUDA tensors otherwise.

Shapes are small and odd (non-powers of two, single-element groups) because the interpreter
runs every program of a launch in Python; ``streaming`` cases lower the tile size so that
the multi-tile loops run on them too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import in_layout
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy_reference import backward as np_backward
from numpy_reference import forward as np_forward
from numpy_reference import masked_backward as np_masked_backward
from numpy_reference import masked_forward as np_masked_forward

import normlab as nl
from normlab.core.kernels import triton as tk

pytestmark = pytest.mark.skipif(not tk.available(), reason=tk.status())

if tk.available():
    from normlab.core.kernels.triton import channel as channel_module
    from normlab.core.kernels.triton import row as row_module

DEVICE = "cpu" if tk.interpreted() else "cuda"
ACTS = ("identity", "relu", "leaky_relu", "elu", "silu", "prelu")
PARAMS = {"leaky_relu": 0.2, "elu": 0.7}


@pytest.fixture(params=["resident", "streaming"])
def tiling(request, monkeypatch):
    """Whole groups in one tile, or tiles of 8 elements (loops over rows and channel chunks)."""
    if request.param == "streaming":
        monkeypatch.setattr(channel_module, "TILE_ELEMENTS", 8)
        monkeypatch.setattr(channel_module, "RESIDENT_ELEMENTS", 8)
        monkeypatch.setattr(channel_module, "COLUMN_CHANNELS", 4)
        monkeypatch.setattr(channel_module, "PLANE_CHANNELS", 2)
        monkeypatch.setattr(channel_module, "BATCH_PLANE_CHANNELS", 2)
    return request.param


# --- the float64 reference -----------------------------------------------------------------------


def _act(z, name, param, slope):
    if name == "relu":
        return np.maximum(z, 0), (z > 0).astype(np.float64)
    if name == "leaky_relu":
        return np.where(z > 0, z, param * z), np.where(z > 0, 1.0, param)
    if name == "elu":
        return np.where(z > 0, z, param * np.expm1(np.minimum(z, 0))), np.where(
            z > 0, 1.0, param * np.exp(np.minimum(z, 0))
        )
    if name == "silu":
        sig = 1 / (1 + np.exp(-z))
        return z * sig, sig * (1 + z * (1 - sig))
    if name == "prelu":
        return np.where(z > 0, z, slope * z), np.where(z > 0, 1.0, slope)
    return z, np.ones_like(z)


def reference(
    x, weight, bias, dy, *, groups=-1, eps=1e-5, act="identity", param=0.0, prelu=None, mask=None, given=None
):
    """(y, dx, dγ, dβ, dPReLU) in float64 from the staged NumPy formulas (numpy_reference.py)
    and the activation's chain rule on top."""
    xn = x.detach().double().cpu().numpy()
    n, c = xn.shape[:2]
    rest = xn.shape[2:]
    if groups < 0:
        shaped, axes = xn, (0,) + tuple(range(2, xn.ndim))
        pview = (1, c) + (1,) * len(rest)
        m = None if mask is None else mask.cpu().numpy()[:, None]
    else:
        shaped = xn.reshape(n, groups, c // groups, *rest)
        axes = tuple(range(2, shaped.ndim))
        pview = (1, groups, c // groups) + (1,) * len(rest)
        m = None if mask is None else mask.cpu().numpy()[:, None, None]

    def p(t):
        return None if t is None else t.detach().double().cpu().numpy().reshape(pview)

    stats = None
    if given is not None:
        stats = tuple(t.detach().double().cpu().numpy().reshape(pview) for t in given)
    if m is None:
        z, cache = np_forward(shaped, p(weight), p(bias), axes, eps, stats=stats)
    else:
        z, cache = np_masked_forward(shaped, m, p(weight), p(bias), axes, eps, stats=stats)
    z = z.reshape(xn.shape)
    slope = 0.0
    if act == "prelu":
        slope = prelu.detach().double().cpu().numpy().reshape((1, -1) + (1,) * len(rest))
    y, grad = _act(z, act, param, slope)
    if m is not None:
        y = y * np.broadcast_to(mask.cpu().numpy()[:, None], xn.shape)
    dyn = dy.detach().double().cpu().numpy()
    dz = (dyn * grad).reshape(shaped.shape)
    dx, dw, db = (np_backward if m is None else np_masked_backward)(dz, cache)
    dslope = None
    if act == "prelu":
        valid = np.ones_like(z) if mask is None else np.broadcast_to(mask.cpu().numpy()[:, None], xn.shape)
        dslope = (dyn * z * (z <= 0) * valid).sum(axis=(0,) + tuple(range(2, xn.ndim)))
    as_t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a)).reshape(-1)  # noqa: E731
    return torch.from_numpy(y), torch.from_numpy(dx.reshape(xn.shape)), as_t(dw), as_t(db), as_t(dslope)


def close(actual, expected, tol, what):
    """Relative to the largest entry of the float64 truth (a sum's rounding scales with it),
    and absolute below 1 (a truth of rounding noise, e.g. LayerNorm of one element, is 0)."""
    actual, expected = actual.detach().double().cpu(), expected.double()
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() / scale if expected.numel() else 0.0
    assert err <= tol, f"{what}: max error {err:.3g} × the largest entry (tolerance {tol})"


def run_channel(x, weight, bias, *, groups=-1, act="identity", prelu=None, mask=None, **call):
    """Forward and backward through the Triton entry; returns (y, dx, dγ, dβ, dPReLU, dy)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias, prelu)]
    xl, wl, bl, pl = leaves
    if x.layout == torch.strided and not x.is_contiguous():
        xl = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x).requires_grad_()
    param = call.pop("param", PARAMS.get(act, 0.0))
    out = tk.channel_norm(
        xl,
        wl,
        bl,
        groups=groups,
        eps=call.pop("eps", 1e-5),
        activation=act,
        param=param,
        prelu_weight=pl,
        mask=mask,
        **call,
    )
    dy = torch.randn_like(out.y)
    wanted = [t for t in (xl, wl, bl, pl) if t is not None]
    grads = iter(torch.autograd.grad(out.y, wanted, dy))
    got = [next(grads) if t is not None else None for t in (xl, wl, bl, pl)]
    return out, got, dy


def sample(shape, dtype=torch.float32, layout="contiguous", scale=1.0, mean=0.0):
    x = (torch.randn(shape, dtype=torch.float64) * scale + mean).to(dtype)
    return in_layout(x, layout).to(DEVICE)


# --- the channel family ----------------------------------------------------------------------------


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("groups", [-1, 1, 2, 6], ids=["batch", "group1", "group2", "instance"])
def test_channel_every_activation(act, groups):
    x = sample((3, 6, 4, 3))
    w, b = torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE)
    prelu = torch.rand(6, device=DEVICE) * 0.5 if act == "prelu" else None
    out, (dx, dw, db, dp), dy = run_channel(x, w, b, groups=groups, act=act, prelu=prelu)
    y_ref, dx_ref, dw_ref, db_ref, dp_ref = reference(
        x, w, b, dy, groups=groups, act=act, param=PARAMS.get(act, 0.0), prelu=prelu
    )
    close(out.y, y_ref, 1e-6, "y")
    close(dx, dx_ref, 2e-6, "dx")
    close(dw, dw_ref, 2e-6, "dγ")
    close(db, db_ref, 2e-6, "dβ")
    if act == "prelu":
        close(dp, dp_ref, 2e-6, "dPReLU")


_SHAPED_LAYOUTS = [
    (shape, layout)
    for shape in ((2, 6, 3, 3), (3, 6, 7))
    for layout in ("contiguous", "channels_last", "noncontiguous")
] + [((4, 6), "contiguous")]


@pytest.mark.parametrize("groups", [-1, 2, 6], ids=["batch", "group2", "instance"])
@pytest.mark.parametrize("shape,layout", _SHAPED_LAYOUTS, ids=[f"{len(s)}d-{lay}" for s, lay in _SHAPED_LAYOUTS])
def test_channel_layouts_and_tilings(shape, groups, layout, tiling):
    x = sample(shape, layout=layout)
    w, b = torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE)
    out, (dx, dw, db, _), dy = run_channel(x, w, b, groups=groups, act="leaky_relu")
    y_ref, dx_ref, dw_ref, db_ref, _ = reference(x, w, b, dy, groups=groups, act="leaky_relu", param=0.2)
    close(out.y, y_ref, 1e-6, "y")
    close(dx, dx_ref, 2e-6, "dx")
    close(dw, dw_ref, 2e-6, "dγ")
    close(db, db_ref, 2e-6, "dβ")
    if layout != "noncontiguous":  # the output keeps the input's memory layout
        assert out.y.stride() == x.stride()


def test_channel_large_groups_in_chunks(monkeypatch):
    """GroupNorm whose groups span more channels than a tile: one group per program, its
    channels in chunks, γ differing within the group."""
    monkeypatch.setattr(channel_module, "COLUMN_CHANNELS", 4)
    monkeypatch.setattr(channel_module, "PLANE_CHANNELS", 4)
    for layout in ("contiguous", "channels_last"):
        x = sample((2, 12, 3, 2), layout=layout)
        w, b = torch.randn(12, device=DEVICE), torch.randn(12, device=DEVICE)
        tiling = channel_module.channel_tiling(tuple(x.shape), layout == "channels_last", 1)
        assert tiling.group_mode == 2 and tiling.chunks == 3
        out, (dx, dw, db, _), dy = run_channel(x, w, b, groups=1, act="elu")
        y_ref, dx_ref, dw_ref, db_ref, _ = reference(x, w, b, dy, groups=1, act="elu", param=0.7)
        close(out.y, y_ref, 1e-6, "y")
        close(dx, dx_ref, 2e-6, "dx")
        close(dw, dw_ref, 2e-6, "dγ")
        close(db, db_ref, 2e-6, "dβ")


@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_channel_without_affine(affine):
    x = sample((3, 4, 5))
    w = torch.randn(4, device=DEVICE) if affine == "weight" else None
    b = torch.randn(4, device=DEVICE) if affine == "bias" else None
    for groups in (-1, 2):
        out, (dx, dw, db, _), dy = run_channel(x, w, b, groups=groups, act="silu")
        y_ref, dx_ref, dw_ref, db_ref, _ = reference(x, w, b, dy, groups=groups, act="silu")
        close(out.y, y_ref, 1e-6, "y")
        close(dx, dx_ref, 2e-6, "dx")
        if w is not None:
            close(dw, dw_ref, 2e-6, "dγ")
        if b is not None:
            close(db, db_ref, 2e-6, "dβ")


@pytest.mark.parametrize("groups", [-1, 3], ids=["batch", "group"])
def test_channel_large_mean_accuracy(groups, tiling):
    """1e4 ± 0.01 in float32: within 1e-6 of float64, as the CPU kernels are (torch.nn's own
    float32 BatchNorm is off by 4e-2 here)."""
    x = sample((4, 6, 5, 7), scale=0.01, mean=1e4)
    w, b = torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE)
    out, (dx, dw, db, _), dy = run_channel(x, w, b, groups=groups)
    y_ref, dx_ref, dw_ref, db_ref, _ = reference(x, w, b, dy, groups=groups)
    close(out.y, y_ref, 1e-6, "y")
    close(dx, dx_ref, 1e-6, "dx")
    close(dw, dw_ref, 1e-6, "dγ")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("groups", [-1, 2], ids=["batch", "group"])
def test_channel_half_precision(dtype, groups):
    """Half inputs, float32 statistics and arithmetic: the output is the float64 answer
    rounded once (within an ulp or two of the half dtype)."""
    x = sample((3, 4, 5, 2), dtype=dtype, layout="channels_last")
    w, b = torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE)
    out, (dx, dw, db, _), dy = run_channel(x, w, b, groups=groups, act="relu")
    assert out.y.dtype == dtype and dx.dtype == dtype and dw.dtype == torch.float32
    y_ref, dx_ref, dw_ref, _, _ = reference(x, w, b, dy.float(), groups=groups, act="relu")
    ulp = 2 * torch.finfo(dtype).eps
    close(out.y, y_ref, ulp, "y")
    close(dx, dx_ref, 2 * ulp, "dx")
    close(dw, dw_ref, 1e-5, "dγ")


def test_channel_single_element_groups():
    """A group of one value has variance 0: the output is β (act(β)), the input gradient 0."""
    x = sample((2, 4, 1, 1))
    w, b = torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE)
    out, (dx, _, db, _), dy = run_channel(x, w, b, groups=4, act="identity")
    close(out.y, b.view(1, 4, 1, 1).expand(2, 4, 1, 1).cpu(), 1e-6, "y")
    assert dx.abs().max().item() == 0.0
    close(db, dy.sum((0, 2, 3)).cpu(), 1e-6, "dβ")


# --- against torch.nn: outputs, gradients and running estimates over several steps ---------------


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batchnorm_steps_match_torch_nn(momentum, layout):
    bn = torch.nn.BatchNorm2d(5, momentum=momentum).to(DEVICE)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    rm, rv, nbt = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    for _ in range(3):
        x = sample((3, 5, 4, 3), layout=layout, scale=2.0, mean=1.0)
        xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        yt = F.relu(bn(xt))
        out = tk.channel_norm(
            xo,
            bn.weight,
            bn.bias,
            eps=bn.eps,
            running_mean=rm,
            running_var=rv,
            num_batches_tracked=nbt,
            momentum=momentum,
            activation="relu",
        )
        dy = torch.randn_like(yt)
        torch.testing.assert_close(out.y, yt, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            torch.autograd.grad(out.y, xo, dy)[0], torch.autograd.grad(yt, xt, dy)[0], rtol=1e-4, atol=1e-5
        )
    torch.testing.assert_close(rm, bn.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv, bn.running_var, rtol=1e-6, atol=1e-6)
    assert int(nbt) == int(bn.num_batches_tracked) == 3
    bn.eval()
    x = sample((3, 5, 4, 3), layout=layout)
    torch.testing.assert_close(
        tk.channel_norm(x, bn.weight, bn.bias, eps=bn.eps, batch_stats=False, running_mean=rm, running_var=rv).y,
        bn(x),
        rtol=1e-6,
        atol=1e-6,
    )


def test_running_update_biased_and_statistics_returned():
    x = sample((4, 3, 5))
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    out = tk.channel_norm(x, None, None, eps=1e-5, running_mean=rm, running_var=rv, momentum=0.5, unbiased=False)
    var, mean = torch.var_mean(x.double(), dim=(0, 2), correction=0)
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.var.double(), var, rtol=1e-6, atol=1e-6)
    assert out.count.tolist() == [20.0] * 3
    torch.testing.assert_close(rm.double(), 0.5 * mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv.double(), 0.5 + 0.5 * var, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy, inside the interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_batch_leaves_running_estimates(bad):
    x = sample((4, 3, 5))
    x[1, 2, 3] = bad
    rm, rv, nbt = torch.randn(3, device=DEVICE), torch.rand(3, device=DEVICE) + 1, torch.tensor(7, device=DEVICE)
    before = (rm.clone(), rv.clone())
    with pytest.warns(RuntimeWarning, match="not finite") if DEVICE == "cpu" else _nothing():
        out = tk.channel_norm(
            x, None, None, eps=1e-5, running_mean=rm, running_var=rv, num_batches_tracked=nbt, momentum=None
        )
    assert int(out.status) == 0
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1]) and int(nbt) == 7
    with pytest.raises(nl.core.NonFiniteStatisticsError):
        tk.channel_norm(
            x, None, None, eps=1e-5, running_mean=rm, running_var=rv, num_batches_tracked=nbt, on_nonfinite="raise"
        )
    assert torch.equal(rm, before[0]) and int(nbt) == 7


def test_half_running_variance_that_would_overflow_is_skipped():
    x = sample((4, 2, 8), scale=300.0)  # variance 9e4: fine in float32, inf once stored in float16
    rm, rv = torch.zeros(2, device=DEVICE, dtype=torch.float16), torch.ones(2, device=DEVICE, dtype=torch.float16)
    with pytest.warns(RuntimeWarning) if DEVICE == "cpu" else _nothing():
        out = tk.channel_norm(x, None, None, eps=1e-5, running_mean=rm, running_var=rv, momentum=1.0)
    assert int(out.status) == 0 and rv.tolist() == [1.0, 1.0]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- masks ------------------------------------------------------------------------------------------


def _mask(n, length, lengths):
    return torch.arange(length, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]


@pytest.mark.parametrize("groups", [-1, 2, 6], ids=["batch", "group", "instance"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_masked_matches_reference(groups, layout, tiling):
    x = sample((3, 6, 7), layout=layout)
    mask = _mask(3, 7, [7, 3, 0])  # full, partial and an empty sample
    x = x.masked_fill(~mask[:, None], float("nan"))  # padding must never leak
    w, b = torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE)
    out, (dx, dw, db, _), dy = run_channel(x, w, b, groups=groups, act="elu", mask=mask)
    y_ref, dx_ref, dw_ref, db_ref, _ = reference(
        x.nan_to_num(0.0), w, b, dy, groups=groups, act="elu", param=0.7, mask=mask
    )
    close(out.y, y_ref, 1e-6, "y")
    close(dx, dx_ref, 2e-6, "dx")
    close(dw, dw_ref, 2e-6, "dγ")
    close(db, db_ref, 2e-6, "dβ")
    assert torch.isfinite(out.y).all() and torch.isfinite(dx).all()


def test_masked_batchnorm_matches_the_composed_path_and_updates_running():
    x = sample((4, 3, 9))
    mask = _mask(4, 9, [9, 5, 2, 7])
    rm, rv, nbt = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE), torch.tensor(0, device=DEVICE)
    out = tk.channel_norm(x, None, None, eps=1e-5, mask=mask, running_mean=rm, running_var=rv, num_batches_tracked=nbt)
    bn = nl.nn.BatchNorm1d(3, affine=False).to(DEVICE)
    with nl.core.use_backend("composed"):
        expected = bn(x, mask=mask)
    torch.testing.assert_close(out.y, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rm, bn.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv, bn.running_var, rtol=1e-6, atol=1e-6)
    assert int(nbt) == 1 and out.count.tolist() == [23.0] * 3


def test_masked_batch_with_one_valid_value_leaves_running_estimates():
    x = sample((2, 3, 4))
    mask = _mask(2, 4, [1, 0])
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    out = tk.channel_norm(x, None, None, eps=1e-5, mask=mask, running_mean=rm, running_var=rv)
    assert int(out.status) == 2 and rm.tolist() == [0.0] * 3 and rv.tolist() == [1.0] * 3


def test_masked_eval_and_broadcast_mask():
    x = sample((2, 3, 4, 5))
    mask = (torch.rand(2, 1, 5, device=DEVICE) > 0.3).expand(2, 4, 5)  # spatial strides that do not collapse
    rm, rv = torch.randn(3, device=DEVICE), torch.rand(3, device=DEVICE) + 0.5
    w, b = torch.randn(3, device=DEVICE), torch.randn(3, device=DEVICE)
    out, (dx, dw, db, _), dy = run_channel(x, w, b, mask=mask, batch_stats=False, running_mean=rm, running_var=rv)
    y_ref, dx_ref, dw_ref, db_ref, _ = reference(x, w, b, dy, mask=mask, given=(rm, rv))
    close(out.y, y_ref, 1e-6, "y")
    close(dx, dx_ref, 1e-6, "dx")
    close(dw, dw_ref, 1e-6, "dγ")
    close(db, db_ref, 1e-6, "dβ")


# --- in place -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["identity", "leaky_relu", "elu"])
@pytest.mark.parametrize("groups", [-1, 2], ids=["batch", "group"])
@pytest.mark.parametrize("gamma", ["random", "some_zero", "tiny"])
def test_inplace_matches_out_of_place(act, groups, gamma):
    x = sample((3, 4, 3, 5), layout="channels_last")
    w = torch.randn(4, device=DEVICE)
    if gamma == "some_zero":
        w[1] = 0.0
    elif gamma == "tiny":
        w[2] = 1e-7
    b = torch.randn(4, device=DEVICE)
    ref_out, (dx_ref, dw_ref, db_ref, _), dy = run_channel(x, w, b, groups=groups, act=act)
    xi = x.clone()
    base = xi.clone().requires_grad_()
    xv = base.clone()  # a non-leaf that may be overwritten
    wl, bl = w.clone().requires_grad_(), b.clone().requires_grad_()
    out = tk.channel_norm(xv, wl, bl, groups=groups, eps=1e-5, activation=act, param=PARAMS.get(act, 0.0), inplace=True)
    assert out.y.data_ptr() == xv.data_ptr()  # written over the input
    dx, dw, db = torch.autograd.grad(out.y, (base, wl, bl), dy)
    torch.testing.assert_close(out.y, ref_out.y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(db, db_ref, rtol=1e-5, atol=2e-5)


def test_inplace_keeps_only_the_output():
    x = sample((4, 8, 5, 5)).requires_grad_()
    w = torch.randn(8, device=DEVICE, requires_grad=True)
    b = torch.randn(8, device=DEVICE, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    for inplace in (False, True):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            tk.channel_norm(x.clone(), w, b, eps=1e-5, activation="leaky_relu", param=0.01, inplace=inplace)
        big = [t for t in saved if t.numel() == x.numel()]
        assert len(big) == 1  # in place: the output; out of place: the input (the output is not kept)


def test_inplace_refuses_second_derivatives():
    x = sample((3, 4, 5)).requires_grad_()
    y = tk.channel_norm(x.clone(), None, None, eps=1e-5, activation="leaky_relu", param=0.1, inplace=True).y
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


# --- the row family --------------------------------------------------------------------------------


@pytest.mark.parametrize("centered", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("add", [False, True], ids=["plain", "add"])
@pytest.mark.parametrize("shape,normalized", [((3, 5, 37), (37,)), ((4, 3, 6), (3, 6)), ((2, 1), (1,))])
def test_row_matches_torch_and_reference(centered, add, shape, normalized):
    x = sample(shape).requires_grad_()
    r = sample(shape).requires_grad_() if add else None
    w = torch.randn(normalized, device=DEVICE, requires_grad=True)
    b = torch.randn(normalized, device=DEVICE, requires_grad=True) if centered else None
    out = tk.row_norm(x, normalized, w, b, 1e-5, centered=centered, residual=r)
    y, s = out if add else (out, None)
    s_ref = x + r if add else x
    y_ref = (
        F.layer_norm(s_ref.double(), normalized, w.double(), b.double(), 1e-5)
        if centered
        else F.rms_norm(s_ref.double(), normalized, w.double(), 1e-5)
    )
    close(y, y_ref.detach().cpu(), 1e-6, "y")
    if add:
        torch.testing.assert_close(s, (x + r).detach())
    dy = torch.randn_like(y)
    ds = torch.randn_like(y) if add else None
    inputs = [t for t in (x, r, w, b) if t is not None]
    got = torch.autograd.grad([y] + ([s] if add else []), inputs, [dy] + ([ds] if add else []))
    want = torch.autograd.grad([y_ref] + ([s_ref] if add else []), inputs, [dy.double()] + ([ds] if add else []))
    for name, g, e in zip(("x", "residual", "γ", "β") if add else ("x", "γ", "β"), got, want):
        close(g, e.detach().cpu(), 2e-6, f"d{name}")


def test_row_numpy_reference_and_large_mean():
    x = sample((6, 50), scale=0.01, mean=1e4)
    w, b = torch.randn(50, device=DEVICE), torch.randn(50, device=DEVICE)
    y = tk.row_norm(x, (50,), w, b, 1e-5, centered=True)
    y_ref, _ = np_forward(x.double().cpu().numpy(), w.double().cpu().numpy(), b.double().cpu().numpy(), (1,), 1e-5)
    close(y, torch.from_numpy(y_ref), 1e-6, "y")
    xl = x.clone().requires_grad_()
    dy = torch.randn_like(x)
    dx = torch.autograd.grad(tk.row_norm(xl, (50,), w, b, 1e-5, centered=True), xl, dy)[0]
    _, cache = np_forward(x.double().cpu().numpy(), w.double().cpu().numpy(), b.double().cpu().numpy(), (1,), 1e-5)
    close(dx, torch.from_numpy(np_backward(dy.double().cpu().numpy(), cache)[0]), 1e-6, "dx")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_row_half_precision(dtype):
    x, r = sample((5, 24), dtype=dtype), sample((5, 24), dtype=dtype)
    w = torch.randn(24, device=DEVICE, dtype=dtype)
    y, s = tk.row_norm(x, (24,), w, None, 1e-5, centered=False, residual=r)
    assert torch.equal(s, x + r)  # the sum rounded to the dtype, as torch's add
    close(y, F.rms_norm(s.double(), (24,), w.double(), 1e-5).cpu(), 2 * torch.finfo(dtype).eps, "y")


def test_row_only_the_sum_used():
    x, r = sample((3, 8)).requires_grad_(), sample((3, 8)).requires_grad_()
    w = torch.randn(8, device=DEVICE, requires_grad=True)
    _, s = tk.row_norm(x, (8,), w, None, 1e-5, centered=False, residual=r)
    dx, dr, dw = torch.autograd.grad(s.sum(), (x, r, w), allow_unused=True)
    assert torch.equal(dx, torch.ones_like(x)) and torch.equal(dr, torch.ones_like(r))
    assert dw is None or not dw.any()


def test_row_backward_many_rows_per_program(monkeypatch):
    monkeypatch.setattr(row_module, "BACKWARD_PROGRAMS", 3)  # 10 rows: 4 + 4 + 2
    monkeypatch.setattr(row_module, "MIN_ROWS_PER_PROGRAM", 1)
    x = sample((10, 7)).requires_grad_()
    w = torch.randn(7, device=DEVICE, requires_grad=True)
    b = torch.randn(7, device=DEVICE, requires_grad=True)
    y = tk.row_norm(x, (7,), w, b, 1e-5, centered=True)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), dy)
    want = torch.autograd.grad(F.layer_norm(x.double(), (7,), w.double(), b.double(), 1e-5), (x, w, b), dy.double())
    for g, e in zip(got, want):
        close(g, e.cpu(), 2e-6, "grad")


def test_row_backward_of_no_rows():
    # an empty batch launches no program: the backward's partial-sum split divided by zero rows per program
    x = sample((0, 5)).requires_grad_()
    w = torch.randn(5, device=DEVICE, requires_grad=True)
    b = torch.randn(5, device=DEVICE, requires_grad=True)
    y = tk.row_norm(x, (5,), w, b, 1e-5, centered=True)
    dx, dw, db = torch.autograd.grad(y.sum(), (x, w, b))
    assert dx.shape == (0, 5) and torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))


# --- second derivatives, compile, meta, launches ------------------------------------------------------


def test_second_derivatives_through_the_composed_reference():
    x = sample((3, 4, 5)).requires_grad_()
    w = torch.randn(4, device=DEVICE, requires_grad=True)
    y = tk.channel_norm(x, w, None, groups=2, eps=1e-5, activation="silu").y
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (ggw,) = torch.autograd.grad(gx.square().sum(), w)
    xr = x.detach().clone().requires_grad_()
    wr = w.detach().clone().requires_grad_()
    yr = F.silu(F.group_norm(xr, 2, wr, None, 1e-5))
    (gxr,) = torch.autograd.grad(yr.square().sum(), xr, create_graph=True)
    (ggwr,) = torch.autograd.grad(gxr.square().sum(), wr)
    torch.testing.assert_close(gx, gxr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ggw, ggwr, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("centered", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("add", [False, True], ids=["plain", "add"])
def test_row_second_derivatives_through_the_composed_reference(centered, add):
    """The row operator's backward under ``create_graph``: gradients of gradients (for x, the
    residual, γ and β) as torch's layer_norm/rms_norm give them."""
    shape, normalized = (4, 3, 6), (3, 6)
    x = sample(shape).requires_grad_()
    r = sample(shape).requires_grad_() if add else None
    w = torch.randn(normalized, device=DEVICE, requires_grad=True)
    b = torch.randn(normalized, device=DEVICE, requires_grad=True) if centered else None
    out = tk.row_norm(x, normalized, w, b, 1e-5, centered=centered, residual=r)
    y, s = out if add else (out, x)
    s_ref = x + r if add else x
    y_ref = F.layer_norm(s_ref, normalized, w, b, 1e-5) if centered else F.rms_norm(s_ref, normalized, w, 1e-5)
    inputs = [t for t in (x, r, w, b) if t is not None]
    got, want = [], []
    for out_y, out_s, sink in ((y, s, got), (y_ref, s_ref, want)):
        first = torch.autograd.grad(out_y.square().sum() + out_s.sin().sum(), inputs, create_graph=True)
        sink.extend(torch.autograd.grad(sum(g.square().sum() for g in first), inputs))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_meta_device_shapes_and_backward():
    x = torch.empty(3, 6, 4, 4, device="meta").to(memory_format=torch.channels_last).requires_grad_()
    w = torch.empty(6, device="meta", requires_grad=True)
    out = tk.channel_norm(x, w, None, groups=3, eps=1e-5, activation="relu")
    assert out.y.shape == x.shape and out.y.stride() == x.stride() and out.stats.shape == (5, 9)
    out.y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    y, s = tk.row_norm(
        torch.empty(2, 5, 8, device="meta"),
        (8,),
        None,
        None,
        1e-5,
        centered=True,
        residual=torch.empty(2, 5, 8, device="meta"),
    )
    assert y.shape == s.shape == (2, 5, 8)


def test_one_launch_per_direction():
    x = sample((3, 6, 4, 3), layout="channels_last").requires_grad_()
    w = torch.randn(6, device=DEVICE, requires_grad=True)
    b = torch.randn(6, device=DEVICE, requires_grad=True)
    mask = torch.rand(3, 4, 3, device=DEVICE) > 0.3
    rm, rv, nbt = torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE), torch.tensor(0, device=DEVICE)
    calls = {
        "batchnorm + relu, running update": lambda: (
            tk.channel_norm(
                x, w, b, eps=1e-5, activation="relu", running_mean=rm, running_var=rv, num_batches_tracked=nbt
            ).y
        ),
        "groupnorm + silu": lambda: tk.channel_norm(x, w, b, groups=3, eps=1e-5, activation="silu").y,
        "masked batchnorm": lambda: tk.channel_norm(x, w, b, eps=1e-5, mask=mask, running_mean=rm, running_var=rv).y,
        "masked groupnorm": lambda: tk.channel_norm(x, w, b, groups=2, eps=1e-5, mask=mask).y,
        "eval batchnorm + leaky_relu": lambda: (
            tk.channel_norm(
                x,
                w,
                b,
                eps=1e-5,
                batch_stats=False,
                running_mean=rm,
                running_var=rv,
                activation="leaky_relu",
                param=0.1,
            ).y
        ),
        "in place, γ all ≥ 1e-5": lambda: (
            tk.channel_norm(x.clone(), w, b, eps=1e-5, activation="leaky_relu", param=0.1, inplace=True).y
        ),
        "add_rms_norm": lambda: tk.row_norm(
            x.reshape(36, 6), (6,), w, None, 1e-5, centered=False, residual=x.reshape(36, 6).detach()
        )[0],
        "layer_norm": lambda: tk.row_norm(x.reshape(36, 6), (6,), w, b, 1e-5, centered=True),
    }
    with torch.no_grad():
        w.abs_().add_(0.1)
    for name, call in calls.items():
        with tk.count_launches() as forward:
            y = call()
        with tk.count_launches() as backward:
            y.backward(torch.ones_like(y))
        assert (forward[0], backward[0]) == (1, 1), name


def test_compile_fullgraph_matches_eager():
    def f(x, w, b, rm, rv):
        y = tk.channel_norm(x, w, b, eps=1e-5, activation="relu", running_mean=rm, running_var=rv).y
        return tk.row_norm(y.flatten(1), (y[0].numel(),), None, None, 1e-5, centered=False) * 2

    x = sample((3, 4, 2, 2))
    w, b = torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE)
    state_eager = (torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE))
    state_compiled = (torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE))
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, b, *state_compiled), f(x, w, b, *state_eager))
    torch.testing.assert_close(state_compiled, state_eager)


def test_takes_channel_and_row_say_why_not():
    x = sample((2, 4, 3))
    assert tk.takes_channel(x) == (True, "")
    assert tk.takes_channel(x.double())[0] is False
    assert "activation" in tk.takes_channel(x, activation="tanh")[1]
    assert (
        "running estimates per (sample, group)"
        in tk.takes_channel(x, groups=2, running_mean=torch.zeros(4, device=DEVICE))[1]
    )
    strided = torch.ones(8, device=DEVICE)[::2]  # would be read as if contiguous
    assert "weight is not a contiguous" in tk.takes_channel(x, weight=strided)[1]
    assert (
        "running_var"
        in tk.takes_channel(
            x, running_mean=torch.zeros(4, device=DEVICE), running_var=torch.ones(1, device=DEVICE).expand(4)
        )[1]
    )
    assert tk.takes_row(x, (3,)) == (True, "")
    assert "residual" in tk.takes_row(x, (3,), residual=sample((1, 4, 3)))[1]
    assert "65536" in tk.takes_row(torch.empty(1, 70000, device=DEVICE), (70000,))[1]
    assert "65535" in tk.takes_channel(torch.empty(70000, 2, 1, device="meta"), groups=1)[1]
    elsewhere = "meta" if DEVICE == "cpu" else "cpu"
    assert tk.takes_channel(torch.empty(2, 4, 3, device=elsewhere))[0] is (elsewhere == "meta")


def test_a_launch_that_fails_resets_the_semaphores():
    """A launch stopped part-way (an error, Ctrl-C) may leave a finishing program's semaphore
    counted up; every counter restarts at 0, so the next running update still happens."""
    from normlab.core.kernels.triton import _runtime

    x = sample((3, 4, 5))
    counter = _runtime.semaphore(x)
    counter.fill_(2)  # as a launch stopped after two programs would leave it

    class Failing:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                raise KeyboardInterrupt

            return run

    with pytest.raises(KeyboardInterrupt):
        _runtime.launch(Failing(), (1,), x)
    assert int(counter) == 0
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    out = tk.channel_norm(x, None, None, eps=1e-5, running_mean=rm, running_var=rv)
    assert int(out.status) == 1 and rm.abs().sum() > 0


def test_shared_prelu_slope_and_5d_channels_last():
    """A single PReLU slope for every channel (torch.nn.PReLU()'s default) gets the gradient
    summed over channels; a 5-D channels_last_3d input is read in place."""
    x = sample((2, 4, 3, 2, 2)).contiguous(memory_format=torch.channels_last_3d)
    w, b = torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE)
    slope = torch.full((1,), 0.3, device=DEVICE)
    out, (dx, dw, db, dp), dy = run_channel(x, w, b, groups=2, act="prelu", prelu=slope)
    y_ref, dx_ref, dw_ref, db_ref, dp_ref = reference(
        x, w, b, dy, groups=2, act="prelu", prelu=slope.expand(4).contiguous()
    )
    assert out.y.stride() == x.stride() and dp.shape == (1,)
    close(out.y, y_ref, 1e-6, "y")
    close(dx, dx_ref, 2e-6, "dx")
    close(dw, dw_ref, 2e-6, "dγ")
    close(dp, dp_ref.sum().reshape(1), 2e-6, "dPReLU")


@settings(max_examples=20)
@given(
    n=st.integers(1, 3),
    per_group=st.integers(1, 3),
    groups=st.integers(1, 3),
    spatial=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    batch_norm=st.booleans(),
    layout=st.sampled_from(["contiguous", "channels_last"]),
    act=st.sampled_from(ACTS),
    affine=st.booleans(),
)
def test_channel_property(n, per_group, groups, spatial, batch_norm, layout, act, affine):
    """Any small shape, grouping, layout and activation: the float64 reference."""
    c = per_group * groups
    shape = (n, c, *spatial)
    if layout == "channels_last" and len(shape) < 3:
        layout = "contiguous"
    x = sample(shape, layout=layout)
    w = torch.randn(c, device=DEVICE) if affine else None
    b = torch.randn(c, device=DEVICE) if affine else None
    prelu = torch.rand(c, device=DEVICE) if act == "prelu" else None
    g = -1 if batch_norm else groups
    out, (dx, dw, db, dp), dy = run_channel(x, w, b, groups=g, act=act, prelu=prelu)
    y_ref, dx_ref, dw_ref, db_ref, dp_ref = reference(
        x, w, b, dy, groups=g, act=act, param=PARAMS.get(act, 0.0), prelu=prelu
    )
    close(out.y, y_ref, 1e-6, "y")
    close(dx, dx_ref, 2e-6, "dx")
    if affine:
        close(dw, dw_ref, 2e-6, "dγ")
        close(db, db_ref, 2e-6, "dβ")
    if act == "prelu":
        close(dp, dp_ref, 2e-6, "dPReLU")
