"""Masked statistics: BatchNorm, InstanceNorm, GroupNorm (and SyncBatchNorm) over the valid
positions of a padded batch.

Checked against a float64 NumPy reference of the masked formulas, gradcheck, and torch.nn
applied to the valid positions alone; padding invariance as a property; empty samples and
batches; the mask's validation; torch.compile, torch.func and fx."""

from __future__ import annotations

import datetime
import socket

import numpy as np
import numpy_reference as ref
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import normlab as nl

F = nl.functional


def _lengths_mask(lengths, L):
    return torch.arange(L) < torch.as_tensor(lengths)[:, None]


def _pad(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """x with every padded position (mask False, broadcast over channels) set to value."""
    positions = mask.unsqueeze(1).expand_as(x)
    return torch.where(positions, x, torch.full_like(x, value))


def _valid_rows(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(n_valid, C): the valid (sample, position) pairs of an (N, C, *S) tensor."""
    return t.movedim(1, -1)[mask.expand((t.shape[0],) + tuple(t.shape[2:]))]


# ---------------------------------------------------------------- float64 NumPy reference

CASES = {
    # name: (input shape, mask shape, groups: -1 for BatchNorm)
    "batch_norm_1d": ((4, 3, 6), (4, 6), -1),
    "batch_norm_2d": ((3, 2, 4, 5), (3, 4, 5), -1),
    "batch_norm_2d_broadcast_mask": ((3, 2, 4, 5), (3, 1, 5), -1),
    "instance_norm": ((3, 4, 7), (3, 7), 4),
    "group_norm": ((3, 6, 5), (3, 5), 3),
    "group_norm_2d": ((2, 4, 3, 3), (2, 3, 3), 2),
}


def _call(name, x, mask, w, b, *, training=True, running=None):
    if name.startswith("batch_norm"):
        rm, rv = running if running is not None else (None, None)
        return F.batch_norm(x, rm, rv, w, b, training, mask=mask)
    if name == "instance_norm":
        return F.instance_norm(x, None, None, w, b, mask=mask)
    groups = CASES[name][2]
    return F.group_norm(x, groups, w, b, mask=mask)


def _reference_view(name, x, mask):
    """The input, mask and axes as the reference's grouped view: (N, G, C//G, *S) for groups."""
    shape, _, groups = CASES[name]
    m = np.broadcast_to(mask, (shape[0],) + shape[2:])[:, None]
    if groups < 0:
        return x, m, (0,) + tuple(range(2, x.ndim))
    grouped = x.reshape((shape[0], groups, shape[1] // groups) + shape[2:])
    return grouped, m[:, None], tuple(range(2, grouped.ndim))


def _affine_view(name, t):
    shape, _, groups = CASES[name]
    if t is None:
        return None
    if groups < 0:
        return t.reshape((1, -1) + (1,) * (len(shape) - 2))
    return t.reshape((1, groups, shape[1] // groups) + (1,) * (len(shape) - 2))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_closed_form_matches_staged_numpy_reference(name, affine):
    shape, mask_shape, _ = CASES[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    mask = torch.rand(mask_shape, generator=g) < 0.6
    mask.view(-1)[0] = True
    w = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5 if affine else None
    b = torch.randn(shape[1], generator=g, dtype=torch.float64) if affine else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    padded = _pad(x, torch.broadcast_to(mask, (shape[0],) + shape[2:]), 1e30)
    xi = padded.clone().requires_grad_()
    params = [t.clone().requires_grad_() for t in (w, b) if t is not None]
    y = _call(name, xi, mask, *(params if affine else (None, None)))
    y.backward(dy)

    xv, mv, axes = _reference_view(name, padded.numpy(), mask.numpy())
    y_ref, cache = ref.masked_forward(
        xv,
        mv,
        _affine_view(name, None if w is None else w.numpy()),
        _affine_view(name, None if b is None else b.numpy()),
        axes,
        1e-5,
    )
    dx_ref, dw_ref, db_ref = ref.masked_backward(dy.numpy().reshape(xv.shape), cache)
    np.testing.assert_allclose(y.detach().numpy(), y_ref.reshape(shape), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(xi.grad.numpy(), dx_ref.reshape(shape), rtol=1e-9, atol=1e-10)
    if affine:
        np.testing.assert_allclose(params[0].grad.numpy(), dw_ref.reshape(-1), rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(params[1].grad.numpy(), db_ref.reshape(-1), rtol=1e-9, atol=1e-10)


def test_given_statistics_match_numpy_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    mask = _lengths_mask([5, 2, 0, 4], 5)
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    dy = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    xi = _pad(x, mask, float("nan")).requires_grad_()
    wi, bi = w.clone().requires_grad_(), b.clone().requires_grad_()
    y = F.batch_norm(xi, rm, rv, wi, bi, False, mask=mask)
    y.backward(dy)
    view = (1, 3, 1)
    y_ref, cache = ref.masked_forward(
        x.numpy(),
        mask.numpy()[:, None],
        w.numpy().reshape(view),
        b.numpy().reshape(view),
        (0, 2),
        1e-5,
        stats=(rm.numpy().reshape(view), rv.numpy().reshape(view)),
    )
    dx_ref, dw_ref, db_ref = ref.masked_backward(dy.numpy(), cache)
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(xi.grad.numpy(), dx_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(wi.grad.numpy(), dw_ref.reshape(-1), rtol=1e-10)
    np.testing.assert_allclose(bi.grad.numpy(), db_ref.reshape(-1), rtol=1e-10)


# ---------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("name", ["batch_norm_1d", "batch_norm_2d_broadcast_mask", "instance_norm", "group_norm"])
def test_gradcheck_and_gradgradcheck_float64(name):
    shape, mask_shape, _ = CASES[name]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(mask_shape, generator=g) < 0.6
    mask.view(-1)[:2] = True
    w = (torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(shape[1], generator=g, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return _call(name, x, mask, w, b)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_gradcheck_eval_with_running_statistics():
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    mask = _lengths_mask([5, 1, 3], 5)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda x, w, b: F.batch_norm(x, rm, rv, w, b, False, mask=mask), (x, w, b))


# ---------------------------------------------------------------- torch.nn on the valid positions


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batchnorm1d_with_mask_equals_torch_on_the_valid_positions(dtype, momentum):
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    g = torch.Generator().manual_seed(3)
    N, C, L = 5, 4, 9
    ours = nl.nn.BatchNorm1d(C, momentum=momentum, dtype=dtype)
    theirs = torch.nn.BatchNorm1d(C, momentum=momentum, dtype=dtype)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
    theirs.load_state_dict(ours.state_dict())
    for step in range(3):
        x = (torch.randn(N, C, L, generator=g, dtype=torch.float64) * 3 + 2).to(dtype)
        lengths = torch.randint(0, L + 1, (N,), generator=g)
        lengths[step % N] = L
        mask = _lengths_mask(lengths, L)
        dy = torch.randn(N, C, L, generator=g, dtype=torch.float64).to(dtype)
        xo = _pad(x, mask, float("nan")).requires_grad_()
        y = ours(xo, mask=mask)
        y.backward(dy)
        xt = _valid_rows(x, mask).clone().requires_grad_()
        yt = theirs(xt)
        yt.backward(_valid_rows(dy, mask))
        torch.testing.assert_close(_valid_rows(y.detach(), mask), yt.detach(), rtol=tol, atol=tol)
        assert (y.detach()[~mask.unsqueeze(1).expand_as(y)] == 0).all()
        torch.testing.assert_close(_valid_rows(xo.grad, mask), xt.grad, rtol=tol, atol=tol)
        assert (xo.grad[~mask.unsqueeze(1).expand_as(y)] == 0).all()
        for p, q in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol)
            p.grad = q.grad = None
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(ours.state_dict()[key], theirs.state_dict()[key], rtol=tol, atol=tol)
    ours.eval(), theirs.eval()
    x = torch.randn(N, C, L, generator=g, dtype=torch.float64).to(dtype)
    mask = _lengths_mask([L, 2, 5, 0, 1], L)
    torch.testing.assert_close(_valid_rows(ours(x, mask=mask), mask), theirs(_valid_rows(x, mask)), rtol=tol, atol=tol)


def test_batchnorm2d_mask_over_positions_equals_torch_on_the_valid_pixels():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    mask = torch.rand(3, 5, 6, generator=g) < 0.5
    # torch's BatchNorm over the n valid pixels as an (n, C) batch: the same statistics
    ours, theirs = nl.nn.BatchNorm2d(4, dtype=torch.float64), torch.nn.BatchNorm1d(4, dtype=torch.float64)
    y = ours(x, mask=mask)
    assert y.is_contiguous(memory_format=torch.channels_last)
    yt = theirs(_valid_rows(x, mask))
    torch.testing.assert_close(_valid_rows(y, mask), yt)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_instance_and_group_norm_with_mask_equal_torch_per_sample_on_the_valid_prefix():
    g = torch.Generator().manual_seed(5)
    N, C, L = 4, 6, 8
    lengths = [8, 3, 5, 2]
    mask = _lengths_mask(lengths, L)
    x = torch.randn(N, C, L, generator=g, dtype=torch.float64)
    gn, gn_t = nl.nn.GroupNorm(3, C, dtype=torch.float64), torch.nn.GroupNorm(3, C, dtype=torch.float64)
    inorm = nl.nn.InstanceNorm1d(C, affine=True, track_running_stats=True, dtype=torch.float64)
    inorm_t = torch.nn.InstanceNorm1d(C, affine=True, track_running_stats=True, dtype=torch.float64)
    with torch.no_grad():
        for layer in (gn, inorm):
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-1, 1)
    gn_t.load_state_dict(gn.state_dict())
    inorm_t.load_state_dict(inorm.state_dict())
    y_gn, y_in = gn(_pad(x, mask, 7.0), mask=mask), inorm(_pad(x, mask, -3.0), mask=mask)
    means, vars_ = [], []
    for i, n in enumerate(lengths):
        torch.testing.assert_close(y_gn[i : i + 1, :, :n], gn_t(x[i : i + 1, :, :n]))
        torch.testing.assert_close(y_in[i : i + 1, :, :n], inorm_t(x[i : i + 1, :, :n]))
        means.append(x[i, :, :n].mean(-1))
        vars_.append(x[i, :, :n].var(-1))
    assert (y_gn[~mask.unsqueeze(1).expand_as(y_gn)] == 0).all()
    # running estimates: the average of the instances' means and unbiased variances
    expected_mean = 0.9 * 0 + 0.1 * torch.stack(means).mean(0)
    expected_var = 0.9 * 1 + 0.1 * torch.stack(vars_).mean(0)
    torch.testing.assert_close(inorm.running_mean, expected_mean)
    torch.testing.assert_close(inorm.running_var, expected_var)


def test_unbatched_instance_norm_takes_a_mask_of_positions():
    x = torch.randn(3, 6, dtype=torch.float64)
    mask = torch.tensor([True, True, False, True, False, True])
    y = nl.nn.InstanceNorm1d(3)(x, mask=mask)
    torch.testing.assert_close(y[:, mask], torch.nn.InstanceNorm1d(3)(x[:, mask]))
    assert (y[:, ~mask] == 0).all()


# ---------------------------------------------------------------- padding never matters


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 6), min_size=2, max_size=4),
    fill=st.sampled_from([0.0, 1e6, -1e30, float("nan"), float("inf"), None]),
    layer=st.sampled_from(["bn", "in", "gn"]),
    seed=st.integers(0, 2**16),
)
def test_padding_values_never_influence_outputs_gradients_or_running_stats(lengths, fill, layer, seed):
    g = torch.Generator().manual_seed(seed)
    N, C, L = len(lengths), 4, 6
    mask = _lengths_mask(lengths, L)
    x = torch.randn(N, C, L, generator=g, dtype=torch.float64)
    other = torch.randn(N, C, L, generator=g, dtype=torch.float64) * 100 if fill is None else torch.full_like(x, fill)
    dy = torch.randn(N, C, L, generator=g, dtype=torch.float64)
    results = []
    for padding in (torch.zeros_like(x), other):
        torch.manual_seed(0)
        module = {
            "bn": lambda: nl.nn.BatchNorm1d(C, dtype=torch.float64),
            "in": lambda: nl.nn.InstanceNorm1d(C, affine=True, track_running_stats=True, dtype=torch.float64),
            "gn": lambda: nl.nn.GroupNorm(2, C, dtype=torch.float64),
        }[layer]()
        xi = torch.where(mask.unsqueeze(1), x, padding).requires_grad_()
        # dy at padded positions is arbitrary too: the output there is a constant
        y = module(xi, mask=mask)
        y.backward(torch.where(mask.unsqueeze(1), dy, padding.nan_to_num(0.0)))
        results.append(
            (y.detach(), xi.grad, [p.grad for p in module.parameters()], [b.clone() for b in module.buffers()])
        )
    (y0, gx0, gp0, b0), (y1, gx1, gp1, b1) = results
    assert torch.isfinite(y0).all() and torch.isfinite(gx0).all()
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(gx1, gx0, rtol=0, atol=0)
    assert (y0[~mask.unsqueeze(1).expand_as(y0)] == 0).all()
    assert (gx0[~mask.unsqueeze(1).expand_as(y0)] == 0).all()
    for a, b in zip(gp0 + b0, gp1 + b1):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- empty samples and batches


def test_sample_without_valid_position_outputs_zero_and_others_are_unaffected():
    x = torch.randn(3, 4, 5)
    mask = _lengths_mask([5, 0, 3], 5)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    y = F.group_norm(x, 2, w, b, mask=mask)
    assert torch.isfinite(y).all() and (y[1] == 0).all()
    torch.testing.assert_close(y[2:, :, :3], F.group_norm(x[2:, :, :3], 2, w, b))
    torch.testing.assert_close(y[:1], F.group_norm(x[:1], 2, w, b))
    yi = F.instance_norm(x, mask=mask)
    assert torch.isfinite(yi).all() and (yi[1] == 0).all()


@pytest.mark.parametrize("valid", [0, 1])
def test_batch_with_fewer_than_two_valid_values_leaves_running_estimates_untouched(valid):
    bn = nl.nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.bias.fill_(0.5)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, 2] = valid == 1
    y = bn(x, mask=mask)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    expected = torch.zeros_like(y)
    if valid:
        expected[1, :, 2] = 0.5  # one value normalizes to 0: the output is β
    torch.testing.assert_close(y, expected)
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    inorm = nl.nn.InstanceNorm1d(3, track_running_stats=True)
    inorm(x, mask=mask)
    assert inorm.num_batches_tracked.item() == 0 and (inorm.running_var == 1).all()


def test_running_update_without_host_sync_matches_the_eager_cpu_skip():
    """Off the CPU (here: under torch.compile, where the CPU shortcut is off) the skip is a where."""
    from normlab.core import update_running_stats_if

    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)

    @torch.compile(fullgraph=True, backend="eager")
    def update(enough):
        update_running_stats_if(
            enough,
            rm,
            rv,
            torch.full((3,), 2.0),
            torch.full((3,), 4.0),
            torch.tensor(5.0),
            0.5,
            num_batches_tracked=nbt,
        )

    update(torch.tensor(False))
    assert (rm == 0).all() and (rv == 1).all() and nbt.item() == 0
    update(torch.tensor(True))
    torch.testing.assert_close(rm, torch.full((3,), 1.0))
    torch.testing.assert_close(rv, torch.full((3,), 0.5 + 0.5 * 4.0 * 5 / 4))
    assert nbt.item() == 1


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "mask, error, words",
    [
        (torch.ones(2, 5), TypeError, "torch.bool"),
        ([[True] * 5] * 2, TypeError, "got list"),
        (torch.ones(2, 6, dtype=torch.bool), ValueError, "(N, *spatial) = (2, 5)"),
        (torch.ones(3, 5, dtype=torch.bool), ValueError, "shape (3, 5)"),
        (torch.ones(2, 1, 5, dtype=torch.bool), ValueError, "broadcasts"),
        (torch.ones(2, 5, dtype=torch.bool, device="meta"), ValueError, "is on meta"),
    ],
)
@pytest.mark.parametrize("layer", ["bn", "gn", "in"])
def test_mask_is_validated_with_clear_errors(mask, error, words, layer):
    module = {"bn": nl.nn.BatchNorm1d(4), "gn": nl.nn.GroupNorm(2, 4), "in": nl.nn.InstanceNorm1d(4)}[layer]
    with pytest.raises(error, match="mask") as info:
        module(torch.randn(2, 4, 5), mask=mask)
    assert words in str(info.value)


def test_broadcast_masks_are_accepted():
    x = torch.randn(2, 3, 4, 5)
    per_column = torch.tensor([True, False, True, True, False])
    y = nl.nn.BatchNorm2d(3)(x, mask=per_column)  # (W,) broadcasts to (N, H, W)
    torch.testing.assert_close(y, nl.nn.BatchNorm2d(3)(x, mask=per_column.expand(2, 4, 5)))
    assert (y[..., 1] == 0).all()


# ---------------------------------------------------------------- dispatch, half precision, activation


def test_masked_calls_take_the_masked_kernels_in_float32_and_the_composed_ops_otherwise():
    x = torch.randn(4, 3, 6)
    mask = _lengths_mask([6, 2, 4, 1], 6)
    with nl.core.record_dispatch() as log:
        F.batch_norm(x, None, None, training=True, mask=mask)
        F.batch_norm(x.double(), None, None, training=True, mask=mask)
    kernels = nl.core.kernels_available() and nl.core.backend() in ("auto", "kernels")
    assert [(op, path) for op, path, _ in log] == [
        ("batch_norm", "kernels" if kernels else "composed"),
        ("batch_norm", "composed"),
    ]
    y16 = F.group_norm(x.bfloat16(), 3, mask=mask)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), F.group_norm(x, 3, mask=mask), rtol=2e-2, atol=2e-2)


def test_norm_act_with_mask_keeps_padded_outputs_zero():
    x = torch.randn(3, 4, 5)
    mask = _lengths_mask([5, 2, 0], 5)
    layer = nl.nn.BatchNormAct1d(4, activation="elu")
    y = layer(x, mask=mask)
    reference = torch.nn.functional.elu(nl.nn.BatchNorm1d(4)(x, mask=mask))
    torch.testing.assert_close(y, reference)
    assert (y[~mask.unsqueeze(1).expand_as(y)] == 0).all()
    yg = nl.nn.GroupNormAct(2, 4, activation="silu")(x, mask=mask)
    torch.testing.assert_close(yg, torch.nn.functional.silu(F.group_norm(x, 2, mask=mask)))


# ---------------------------------------------------------------- compile, torch.func, fx


class _Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nl.nn.BatchNorm1d(4)
        self.gn = nl.nn.GroupNorm(2, 4)
        self.inorm = nl.nn.InstanceNorm1d(4, affine=True)

    def forward(self, x, mask):
        return self.inorm(self.gn(self.bn(x, mask=mask), mask=mask), mask=mask)


def test_compile_fullgraph_with_mask_equals_eager():
    torch._dynamo.reset()
    model = _Stack()
    x = torch.randn(3, 4, 7)
    mask = _lengths_mask([7, 3, 5], 7)
    eager = _Stack()
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    yc, ye = compiled(xc, mask), eager(xe, mask)
    yc.square().sum().backward()
    ye.square().sum().backward()
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.bn.running_var, eager.bn.running_var)


def test_vmap_and_jvp_see_the_same_masked_norm():
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    mask = _lengths_mask([6, 2, 4], 6)
    per_sample = torch.func.vmap(lambda xs, ms: F.group_norm(xs[None], 2, mask=ms[None])[0])(x, mask)
    torch.testing.assert_close(per_sample, F.group_norm(x, 2, mask=mask))
    tangent = torch.randn_like(x)
    _, jvp_out = torch.func.jvp(lambda t: F.batch_norm(t, None, None, training=True, mask=mask), (x,), (tangent,))
    xi = x.clone().requires_grad_()
    y = F.batch_norm(xi, None, None, training=True, mask=mask)
    # J·t against the closed-form backward's Jᵀ: ⟨J t, u⟩ = ⟨t, Jᵀ u⟩
    u = torch.randn_like(x)
    (vjp,) = torch.autograd.grad(y, xi, u)
    torch.testing.assert_close((jvp_out * u).sum(), (tangent * vjp).sum())


def test_fx_keeps_layers_as_leaves_and_records_the_mask():
    model = _Stack()
    traced = torch.fx.symbolic_trace(model)
    calls = [n for n in traced.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == ["bn", "gn", "inorm"]
    assert all("mask" in n.kwargs for n in calls)
    x = torch.randn(3, 4, 7)
    mask = _lengths_mask([7, 3, 5], 7)
    reference = _Stack()
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(traced(x, mask), reference(x, mask))


# ---------------------------------------------------------------- SyncBatchNorm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_data():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, 3, 5, generator=g, dtype=torch.float64) * 2 + 1
    dy = torch.randn(6, 3, 5, generator=g, dtype=torch.float64)
    mask = _lengths_mask([5, 2, 0, 0, 3, 1], 5)
    return x, dy, mask


def _sync_worker(rank, world, port, out_dir):
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        x, dy, mask = _sync_data()
        shard = slice(0, 2) if rank == 0 else slice(2, 6)  # rank 1's first two samples are empty
        layer = nl.nn.SyncBatchNorm(3, dtype=torch.float64)
        xi = _pad(x, mask, float("nan"))[shard].clone().requires_grad_()
        y = layer(xi, mask=mask[shard])
        y.backward(dy[shard])
        empty = layer(torch.randn(1, 3, 5, dtype=torch.float64), mask=torch.zeros(1, 5, dtype=torch.bool))
        torch.save(
            (
                y.detach(),
                xi.grad,
                layer.weight.grad,
                layer.bias.grad,
                layer.running_mean.clone(),
                layer.running_var.clone(),
                layer.num_batches_tracked.clone(),
                empty.detach(),
            ),
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_sync_batchnorm_counts_valid_positions_across_processes(tmp_path):
    mp.spawn(_sync_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    x, dy, mask = _sync_data()
    layer = nl.nn.BatchNorm1d(3, dtype=torch.float64)
    xi = x.clone().requires_grad_()
    y = layer(xi, mask=mask)
    y.backward(dy)
    torch.testing.assert_close(torch.cat([r[0] for r in results]), y.detach())
    torch.testing.assert_close(torch.cat([r[1] for r in results]), xi.grad)
    torch.testing.assert_close(results[0][2] + results[1][2], layer.weight.grad)
    torch.testing.assert_close(results[0][3] + results[1][3], layer.bias.grad)
    for r in results:
        torch.testing.assert_close(r[4], layer.running_mean)
        torch.testing.assert_close(r[5], layer.running_var)
        assert r[6].item() == 1  # the globally empty second batch was not folded in
        assert (r[7] == 0).all()


def test_eval_with_running_estimates_normalizes_valid_positions_and_zeroes_padding():
    x = torch.randn(3, 4, 6)
    mask = _lengths_mask([6, 2, 0], 6)
    for layer in (nl.nn.InstanceNorm1d(4, affine=True, track_running_stats=True), nl.nn.BatchNorm1d(4)):
        with torch.no_grad():
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
            layer.bias.fill_(0.3)
        layer.eval()
        y = layer(_pad(x, mask, float("inf")), mask=mask)
        expected = torch.where(mask.unsqueeze(1), layer(x), torch.zeros(()))
        torch.testing.assert_close(y, expected)
