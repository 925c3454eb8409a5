"""The masked channel kernels (kernels/cpu/masked.cpp): BatchNorm, InstanceNorm and GroupNorm
over the valid positions of a mask, with a fused activation, in (N, C, L), NCHW,
channels_last and (N, C) layouts — checked against the float64 NumPy reference of the masked
formulas, against normlab's float64 composed ops (themselves gradchecked in
tests/layers/test_masked.py), and against torch.nn on the valid positions; the path rule
routes eager float32 CPU calls to them."""

from __future__ import annotations

import numpy as np
import numpy_reference as ref
import pytest
import torch

import normlab as nl
from normlab import core
from normlab.core.channel import channel_norm
from normlab.core.running import RunningStats

pytestmark = pytest.mark.skipif(
    not core.kernels_available() or core.backend() not in ("auto", "kernels"), reason="the kernels are not used here"
)

ACTIVATIONS = [("identity", 0.0), ("relu", 0.0), ("leaky_relu", 0.1), ("elu", 1.0), ("silu", 0.0), ("prelu", 0.0)]
LAYOUTS = {
    "NCL": (3, 8, 11),
    "NCHW": (3, 8, 4, 5),
    "channels_last": (3, 8, 4, 5),
}
# groups, batch statistics: BatchNorm train / eval, GroupNorm(4), GroupNorm(1), InstanceNorm
GROUPINGS = {"bn": (-1, True), "bn_eval": (-1, False), "gn4": (4, True), "gn1": (1, True), "in": (8, True)}


def _inputs(shape, layout, seed=0, scale=3.0, center=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + center
    positions = (shape[0],) + tuple(shape[2:])
    mask = torch.rand(positions, generator=g) > 0.35
    mask[0] = False  # a sample without a valid position
    x = x.masked_fill(~mask.unsqueeze(1), float("nan"))  # padding never enters
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    w, b = torch.rand(C, generator=g, dtype=torch.float64) + 0.5, torch.randn(C, generator=g, dtype=torch.float64)
    prelu = torch.rand(C, generator=g, dtype=torch.float64) * 0.3
    rm, rv = torch.randn(C, generator=g, dtype=torch.float64), torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    return x, mask, dy, w, b, prelu, rm, rv


def _run(x, mask, dy, w, b, prelu, rm, rv, groups, batch_stats, activation, param, dtype, backend):
    leaves = [t.to(dtype).detach().requires_grad_(True) for t in (x, w, b, prelu)]
    xl, wl, bl, pl = leaves
    if x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
        xl = xl.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        leaves[0] = xl
    tracked = groups < 0 or groups == x.shape[1]
    buffers = (
        {
            "running_mean": rm.to(dtype).clone(),
            "running_var": rv.to(dtype).clone(),
            "num_batches_tracked": torch.tensor(0),
        }
        if tracked
        else {}
    )
    running = RunningStats(buffers, 0.1, True, "skip") if tracked else None
    with core.use_backend(backend), core.record_dispatch() as log:
        y = channel_norm(
            xl,
            wl,
            bl,
            groups=groups,
            eps=1e-5,
            batch_stats=batch_stats,
            running=running,
            activation=activation,
            param=param,
            prelu_weight=pl if activation == "prelu" else None,
            mask=mask,
        )
    y.backward(dy.to(dtype))
    grads = [t.grad for t in leaves[:3]] + ([pl.grad] if activation == "prelu" else [])
    return y.detach(), grads, buffers, log


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("activation,param", ACTIVATIONS)
def test_masked_kernels_match_the_float64_composed_ops(layout, grouping, activation, param):
    groups, batch_stats = GROUPINGS[grouping]
    args = _inputs(LAYOUTS[layout], layout)
    got, grads, buffers, log = _run(*args, groups, batch_stats, activation, param, torch.float32, "auto")
    assert [(path, reason) for _, path, reason in log] == [("kernels", "mask: the masked kernels")]
    want, wgrads, wbuffers, wlog = _run(*args, groups, batch_stats, activation, param, torch.float64, "composed")
    assert wlog[0][1] == "composed"
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)
    assert _rel(got, want) < 1e-6
    for g, w in zip(grads, wgrads):
        assert _rel(g, w) < 2e-6
    for key in ("running_mean", "running_var"):
        if key in buffers:
            assert _rel(buffers[key], wbuffers[key]) < 1e-6
    mask = args[1].unsqueeze(1).expand_as(got)
    assert (got[~mask] == 0).all() and (grads[0][~mask] == 0).all()  # padding: 0 out, 0 gradient


@pytest.mark.parametrize("grouping", ["bn", "bn_eval", "gn4", "in"])
def test_masked_kernels_match_the_numpy_reference(grouping):
    groups, batch_stats = GROUPINGS[grouping]
    x, mask, dy, w, b, prelu, rm, rv = _inputs((4, 8, 13), "NCL", seed=1)
    got, (dx, dw, db), _, _ = _run(
        x, mask, dy, w, b, prelu, rm, rv, groups, batch_stats, "identity", 0.0, torch.float32, "auto"
    )
    xn, mn, dyn = x.numpy(), mask.numpy()[:, None], dy.numpy()
    if groups < 0:
        axes, view = (0, 2), lambda t: t.numpy()[None, :, None]
        stats = None if batch_stats else (view(rm), view(rv))
        y, cache = ref.masked_forward(xn, mn, view(w), view(b), axes, 1e-5, stats=stats)
        rdx, rdw, rdb = ref.masked_backward(dyn, cache)
    else:  # (N, G, C/G, L)
        G = groups
        shape = (4, G, 8 // G, 13)
        y, cache = ref.masked_forward(
            xn.reshape(shape),
            mn[:, :, None],
            w.numpy().reshape(1, G, -1, 1),
            b.numpy().reshape(1, G, -1, 1),
            (2, 3),
            1e-5,
        )
        rdx, rdw, rdb = ref.masked_backward(dyn.reshape(shape), cache)
        y, rdx = y.reshape(xn.shape), rdx.reshape(xn.shape)
    np.testing.assert_allclose(got.numpy(), y, rtol=0, atol=2e-6 * np.abs(y).max())
    np.testing.assert_allclose(dx.numpy(), rdx, rtol=0, atol=2e-6 * np.abs(rdx).max())
    np.testing.assert_allclose(dw.numpy(), rdw.reshape(-1), rtol=0, atol=2e-6 * np.abs(rdw).max())
    np.testing.assert_allclose(db.numpy(), rdb.reshape(-1), rtol=0, atol=2e-6 * np.abs(rdb).max())


def test_large_mean_data_keeps_its_accuracy():
    """1e4 ± 0.01: x − shift is exact (the shift is a valid value of the group), so the
    output and gradients are as accurate as on centered data, where Σx, Σx² would lose
    them all. Compared with float64 on the same float32-rounded input."""
    x, mask, dy, w, b, prelu, rm, rv = _inputs((4, 8, 64), "NCL", seed=2, scale=0.01, center=1e4)
    x = x.float().double()  # what the float32 call sees
    for groups in (-1, 4):
        common = (x, mask, dy, w, b, prelu, rm, rv, groups, True, "identity", 0.0)
        got, grads, _, _ = _run(*common, torch.float32, "auto")
        want, wgrads, _, _ = _run(*common, torch.float64, "composed")
        assert _rel(got, want) < 2e-6
        for g, w_ in zip(grads, wgrads):
            assert _rel(g, w_) < 1e-5


def test_two_dimensional_input_and_broadcast_masks():
    g = torch.Generator().manual_seed(4)
    layer = nl.nn.BatchNorm1d(5)
    x = torch.randn(7, 5, generator=g)
    mask = torch.tensor([True, False, True, True, False, True, True])
    with core.record_dispatch() as log:
        y = layer(x, mask=mask)
    assert log[0][1] == "kernels"
    torch.testing.assert_close(y[mask], torch.nn.functional.batch_norm(x[mask], None, None, training=True))
    assert (y[~mask] == 0).all()
    # a mask broadcast over H ((W,) for (N, C, H, W)) reads as one bool per position
    x4 = torch.randn(2, 3, 4, 5, generator=g)
    per_column = torch.tensor([True, False, True, True, True])
    with core.record_dispatch() as log:
        y4 = nl.nn.BatchNorm2d(3)(x4, mask=per_column)
    assert log[0][1] == "kernels"
    with core.use_backend("composed"):
        torch.testing.assert_close(y4, nl.nn.BatchNorm2d(3)(x4, mask=per_column))


def test_all_padding_batch_leaves_the_running_estimates_and_gives_zeros():
    layer = nl.nn.BatchNorm1d(3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 3, 4, requires_grad=True)
    y = layer(x, mask=torch.zeros(2, 4, dtype=torch.bool))
    y.sum().backward()
    assert (y == 0).all() and (x.grad == 0).all()
    for key in ("running_mean", "running_var"):
        torch.testing.assert_close(layer.state_dict()[key], before[key])


def test_second_derivatives_go_through_the_composed_reference():
    x, mask, dy, w, b, prelu, rm, rv = _inputs((3, 4, 6), "NCL", seed=5)
    outs = []
    for backend in ("auto", "composed"):
        xl = x.float().detach().requires_grad_(True)
        wl = w.float().detach().requires_grad_(True)
        with core.use_backend(backend):
            y = nl.functional.group_norm(xl, 2, wl, None, mask=mask)
        (gx,) = torch.autograd.grad((y * dy.float()).sum(), xl, create_graph=True)
        (gw,) = torch.autograd.grad(gx.pow(2).sum(), wl)
        outs.append(gw)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_forced_composed_and_other_dtypes_keep_the_composed_ops():
    x, mask = torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool)
    with core.use_backend("composed"), core.record_dispatch() as log:
        nl.functional.batch_norm(x, None, None, training=True, mask=mask)
    assert log[0][1] == "composed"
    with core.record_dispatch() as log:
        nl.functional.batch_norm(x.double(), None, None, training=True, mask=mask)
    assert log[0][1] == "composed"


# ---------------------------------------------------------------- the fused per-group route
# Planes (NCL, NCHW) of GroupNorm and InstanceNorm, and BatchNorm's planes of at least 512
# positions, are summed and normalized group by group over each sample's valid span; the
# spans below cover every edge: a sample with no valid position, one, all of them, holes,
# and a span that starts late.

SPAN_LAYOUTS = {"NCL": (5, 8, 520), "NCHW": (5, 8, 24, 24), "channels_last": (5, 8, 24, 24)}


def _span_mask(shape, seed):
    """(N, *spatial): sample 0 all padding, 1 one valid position, 2 all valid, 3 random
    holes, 4 valid only over a middle stretch."""
    g = torch.Generator().manual_seed(seed)
    positions = int(np.prod(shape[2:]))
    flat = torch.zeros(shape[0], positions, dtype=torch.bool)
    flat[1, positions // 3] = True
    flat[2] = True
    flat[3] = torch.rand(positions, generator=g) > 0.5
    flat[4, positions // 4 : positions // 2] = True
    return flat.view((shape[0],) + tuple(shape[2:]))


@pytest.mark.parametrize("layout", list(SPAN_LAYOUTS))
@pytest.mark.parametrize("grouping", ["bn", "bn_eval", "gn4", "in"])
@pytest.mark.parametrize("activation,param", [("identity", 0.0), ("relu", 0.0), ("silu", 0.0), ("prelu", 0.0)])
def test_valid_spans_match_the_float64_composed_ops(layout, grouping, activation, param):
    groups, batch_stats = GROUPINGS[grouping]
    shape = SPAN_LAYOUTS[layout]
    x, _, dy, w, b, prelu, rm, rv = _inputs(shape, layout, seed=7)
    mask = _span_mask(shape, seed=7)
    x = torch.where(mask.unsqueeze(1), x.nan_to_num(0.0), torch.full_like(x, float("inf")))  # padding never enters
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    args = (x, mask, dy, w, b, prelu, rm, rv, groups, batch_stats, activation, param)
    got, grads, buffers, log = _run(*args, torch.float32, "auto")
    assert log[0][1] == "kernels"
    want, wgrads, wbuffers, _ = _run(*args, torch.float64, "composed")
    assert _rel(got, want) < 1e-6
    for g, w_ in zip(grads, wgrads):
        assert _rel(g, w_) < 2e-6
    for key in ("running_mean", "running_var"):
        if key in buffers:
            assert _rel(buffers[key], wbuffers[key]) < 1e-6
    padded = ~mask.unsqueeze(1).expand_as(got)
    assert (got[padded] == 0).all() and (grads[0][padded] == 0).all()
    if groups > 0:  # a sample without a valid position: 0 out, 0 gradient
        assert (got[0] == 0).all() and (grads[0][0] == 0).all()
    if grouping == "in":  # one valid value normalizes to 0: its output is β, its gradient exactly 0
        c = torch.arange(shape[1])
        one = mask[1].flatten().nonzero()[0, 0]
        assert (grads[0][1].flatten(1)[c, one] == 0).all()


def test_a_group_without_valid_positions_gets_zeros_in_every_layout():
    for layout, shape in SPAN_LAYOUTS.items():
        x = torch.randn(shape)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        mask = torch.zeros((shape[0],) + shape[2:], dtype=torch.bool)
        with core.record_dispatch() as log:
            y = nl.functional.group_norm(x, 4, torch.ones(8), torch.full((8,), 0.5), mask=mask)
        assert log[0][1] == "kernels"
        y.backward(torch.randn(shape))
        assert (y == 0).all() and (x.grad == 0).all() and not y.isnan().any()


def test_an_empty_batch_is_answered_without_the_kernels():
    for shape in ((0, 8, 520), (0, 8, 24, 24)):
        x = torch.randn(shape, requires_grad=True)
        mask = torch.ones((0,) + shape[2:], dtype=torch.bool)
        y = nl.functional.instance_norm(x, mask=mask)
        y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape


# ---------------------------------------------------------------- the masked entry: one crossing
# A masked call crosses into C++ once (entries.cpp's masked_channel_norm): the checks the kernels
# need, the kernel, BatchNorm's running update and a C++ autograd node. Where that entry refuses
# a call, normlab's checks report it, with the message every path gives.


def _replaced(attribute, value):
    def make():
        layer = nl.nn.BatchNorm1d(4)
        setattr(layer, attribute, value)
        return layer

    return make


@pytest.mark.parametrize(
    "make,mask",
    [
        (_replaced("weight", torch.nn.Parameter(torch.ones(5))), torch.ones(3, 9, dtype=torch.bool)),
        (_replaced("running_var", torch.ones(4, dtype=torch.float64)), torch.ones(3, 9, dtype=torch.bool)),
        (lambda: nl.nn.GroupNorm(2, 4), torch.ones(3, 8, dtype=torch.bool)),
        (lambda: nl.nn.BatchNorm1d(4), torch.ones(1, 3, 9, dtype=torch.bool)),
        (lambda: nl.nn.InstanceNorm1d(4), torch.ones(2, 9, dtype=torch.bool)),
    ],
    ids=["weight-size", "running-dtype", "mask-length", "mask-rank", "mask-batch"],
)
def test_what_the_masked_entry_refuses_is_reported_as_on_every_path(make, mask):
    x = torch.randn(3, 4, 9)
    errors = []
    for backend in ("auto", "composed"):
        with core.use_backend(backend), pytest.raises((ValueError, TypeError)) as info:
            make()(x, mask=mask)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


def test_a_masked_call_records_one_cpp_node_whose_backward_compiled_autograd_traces():
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    if not hasattr(compiled_autograd, "_enable"):
        pytest.skip("this torch's compiled autograd differs")
    x = torch.randn(3, 4, 9) * 2 + 1
    mask = torch.arange(9) < torch.tensor([9, 4, 1])[:, None]
    weights = torch.randn(3, 4, 9)
    # one PReLU slope: its gradient is summed over the channels in float64, then rounded
    layer = nl.nn.BatchNormAct1d(4, activation="prelu")

    def gradients(backward):
        leaf = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        y = layer(leaf, mask=mask)
        assert y.grad_fn.name() == "NormlabMaskedChannelNormBackward"
        backward((y.square() * weights).sum())
        return [leaf.grad] + [p.grad for p in layer.parameters()]

    def traced(loss):
        with compiled_autograd._enable(torch.compile(backend="eager")):
            loss.backward()

    try:
        eager, compiled = gradients(torch.Tensor.backward), gradients(traced)
    finally:
        torch._dynamo.reset()
    assert len(eager) == 4
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
