"""normlab.functional against torch.nn.functional, and float64 gradcheck of every function."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from helpers import DENSE_LAYOUTS, LAYOUTS, assert_close_scaled, in_layout, memory_format

import normlab.functional as F

# every test here runs once per backend (conftest.BACKENDS)
pytestmark = pytest.mark.usefixtures("backend")

SHAPES_NC = [(4, 6), (3, 6, 7), (2, 6, 5, 3), (2, 6, 3, 2, 3), (1, 6, 9), (5, 6, 1, 1)]


def _params(c, dtype=torch.float64, affine=True):
    if not affine:
        return None, None
    return (torch.randn(c, dtype=dtype) * 0.5 + 1).requires_grad_(), torch.randn(c, dtype=dtype).requires_grad_()


def _grads(y, inputs, dy):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(y, inputs, dy)


def _compare(ours_fn, theirs_fn, x, params, *, rtol, atol):
    """Outputs and every gradient; tolerances scale with each tensor's largest entry."""
    xo = x.detach().clone().requires_grad_()
    xt = x.detach().clone().requires_grad_()
    yo, yt = ours_fn(xo), theirs_fn(xt)
    dy = torch.randn_like(yt)
    go = _grads(yo, [xo, *params], dy)
    gt = _grads(yt, [xt, *params], dy)
    for what, a, b in zip(["output", "d_input", "d_weight", "d_bias", "d_prelu_weight"], [yo, *go], [yt, *gt]):
        assert_close_scaled(a, b, rtol=rtol, atol=atol, what=what)
    return yo


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES_NC, ids=str)
def test_batch_norm_matches_torch_float64(shape, training, affine):
    if training and shape[0] * torch.tensor(shape[2:]).prod() == 1:
        pytest.skip("one value per channel")
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64) * 2 + 3
    w, b = _params(c, affine=affine)
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    _compare(
        lambda z: F.batch_norm(z, rm, rv, w, b, training, 0.3, 1e-4),
        lambda z: TF.batch_norm(z, rm_t, rv_t, w, b, training, 0.3, 1e-4),
        x,
        [w, b],
        rtol=1e-10,
        atol=1e-10,
    )
    torch.testing.assert_close(rm, rm_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, rv_t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("use_input_stats", [True, False])
@pytest.mark.parametrize("shape", [(3, 4, 7), (2, 4, 5, 3), (2, 4, 3, 2, 3), (1, 4, 6)], ids=str)
def test_instance_norm_matches_torch(shape, use_input_stats, layout):
    c = shape[1]
    x = in_layout(torch.randn(shape, dtype=torch.float64), layout)
    w, b = _params(c)
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    _compare(
        lambda z: F.instance_norm(z, rm, rv, w, b, use_input_stats, 0.2, 1e-5),
        lambda z: TF.instance_norm(z, rm_t, rv_t, w, b, use_input_stats, 0.2, 1e-5),
        x,
        [w, b],
        rtol=1e-10,
        atol=1e-10,
    )
    torch.testing.assert_close(rm, rm_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, rv_t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("groups", [1, 2, 3, 6])
@pytest.mark.parametrize("shape", [(3, 6), (2, 6, 7), (2, 6, 5, 3), (1, 6, 3, 2, 3)], ids=str)
def test_group_norm_matches_torch(shape, groups, layout):
    if len(shape) == 2 and groups == shape[1]:
        pytest.skip("one value per group: an error in normlab (tested in test_errors)")
    x = in_layout(torch.randn(shape, dtype=torch.float64) + 1, layout)
    w, b = _params(shape[1])
    y = _compare(
        lambda z: F.group_norm(z, groups, w, b, 1e-5),
        lambda z: TF.group_norm(z, groups, w, b, 1e-5),
        x,
        [w, b],
        rtol=1e-10,
        atol=1e-10,
    )
    if layout == "channels_last" and x.dim() in (4, 5):
        # torch.nn returns a contiguous tensor here; normlab keeps the input's layout.
        assert y.is_contiguous(memory_format=memory_format(layout, x.dim()))


@pytest.mark.parametrize("affine", ["both", "weight", "none"])
@pytest.mark.parametrize(
    "shape,normalized", [((4, 7), (7,)), ((2, 3, 8), (8,)), ((2, 3, 4, 5), (4, 5)), ((3, 4), (3, 4))], ids=str
)
def test_layer_norm_matches_torch(shape, normalized, affine):
    x = torch.randn(shape, dtype=torch.float64) * 3 - 2
    w = (torch.randn(normalized, dtype=torch.float64) + 1).requires_grad_() if affine != "none" else None
    b = torch.randn(normalized, dtype=torch.float64, requires_grad=True) if affine == "both" else None
    _compare(
        lambda z: F.layer_norm(z, normalized, w, b, 1e-5),
        lambda z: TF.layer_norm(z, normalized, w, b, 1e-5),
        x,
        [w, b],
        rtol=1e-10,
        atol=1e-10,
    )


@pytest.mark.parametrize("eps", [None, 1e-3])
@pytest.mark.parametrize("shape,normalized", [((4, 7), (7,)), ((2, 3, 4, 5), (4, 5))], ids=str)
def test_rms_norm_matches_torch(shape, normalized, eps):
    x = torch.randn(shape, dtype=torch.float64)
    w = (torch.randn(normalized, dtype=torch.float64) + 1).requires_grad_()
    _compare(
        lambda z: F.rms_norm(z, normalized, w, eps),
        lambda z: TF.rms_norm(z, normalized, w, eps),
        x,
        [w],
        rtol=1e-10,
        atol=1e-10,
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_matches_torch_within_1e5(layout):
    x = in_layout(torch.randn(8, 16, 9, 9) * 2 + 1, layout)
    w, b = _params(16, torch.float32)
    rm, rv = torch.zeros(16), torch.ones(16)
    rm_t, rv_t = rm.clone(), rv.clone()
    for ours, theirs, params in [
        (lambda z: F.batch_norm(z, rm, rv, w, b, True), lambda z: TF.batch_norm(z, rm_t, rv_t, w, b, True), [w, b]),
        (lambda z: F.group_norm(z, 4, w, b), lambda z: TF.group_norm(z, 4, w, b), [w, b]),
        (lambda z: F.instance_norm(z, None, None, w, b), lambda z: TF.instance_norm(z, None, None, w, b), [w, b]),
        (lambda z: F.layer_norm(z, (9,)), lambda z: TF.layer_norm(z, (9,)), []),
        (lambda z: F.rms_norm(z, (9, 9)), lambda z: TF.rms_norm(z, (9, 9)), []),
    ]:
        _compare(ours, theirs, x, params, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm, rm_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv, rv_t, rtol=1e-6, atol=1e-6)


# --- float64 gradcheck (input, weight, bias) for every function and mode --------------

GRADCHECK_CASES = {
    "batch_norm-train": lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
    "batch_norm-train-tracking": lambda x, w, b: F.batch_norm(
        x, torch.zeros(4, dtype=x.dtype), torch.ones(4, dtype=x.dtype), w, b, True
    ),
    "batch_norm-eval": lambda x, w, b: F.batch_norm(
        x, torch.linspace(-1, 1, 4, dtype=x.dtype), torch.linspace(0.5, 2, 4, dtype=x.dtype), w, b, False
    ),
    "instance_norm": lambda x, w, b: F.instance_norm(x, None, None, w, b),
    "instance_norm-running": lambda x, w, b: F.instance_norm(
        x, torch.linspace(-1, 1, 4, dtype=x.dtype), torch.linspace(0.5, 2, 4, dtype=x.dtype), w, b, False
    ),
    "group_norm-2": lambda x, w, b: F.group_norm(x, 2, w, b),
    "group_norm-1": lambda x, w, b: F.group_norm(x, 1, w, b),
    "layer_norm": lambda x, w, b: F.layer_norm(
        x, x.shape[1:], w.repeat_interleave(15).view(x.shape[1:]), b.repeat_interleave(15).view(x.shape[1:])
    ),
    "rms_norm": lambda x, w, b: F.rms_norm(x, x.shape[1:], w.repeat_interleave(15).view(x.shape[1:])),
}


@pytest.mark.parametrize("layout", DENSE_LAYOUTS)
@pytest.mark.parametrize("case", sorted(GRADCHECK_CASES))
def test_gradcheck_float64(case, layout):
    x = in_layout(torch.randn(3, 4, 5, 3, dtype=torch.float64), layout).requires_grad_()
    w = (torch.randn(4, dtype=torch.float64) + 1).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    fn = GRADCHECK_CASES[case]
    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("case", ["batch_norm-train", "group_norm-2", "layer_norm", "rms_norm", "batch_norm-eval"])
def test_gradgradcheck_float64(case):
    x = torch.randn(3, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(4, dtype=torch.float64) + 1).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(GRADCHECK_CASES[case], (x, w, b))


def test_gradcheck_without_affine():
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    for fn in (
        lambda x: F.batch_norm(x, None, None, training=True),
        lambda x: F.group_norm(x, 3),
        lambda x: F.instance_norm(x),
        lambda x: F.layer_norm(x, (3, 5)),
        lambda x: F.rms_norm(x, (5,)),
    ):
        assert torch.autograd.gradcheck(fn, (x,))


# --- norm_act: one entry to the fused batch and group forms --------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_norm_act_batch_is_batch_norm_then_the_activation(dtype):
    x = torch.randn(6, 4, 5, 3, dtype=dtype) * 2 + 1
    w, b = _params(4, dtype)
    ours_stats = (torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype))
    torch_stats = (torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype))
    ours = lambda z: F.norm_act(  # noqa: E731
        z, "batch", running_mean=ours_stats[0], running_var=ours_stats[1], weight=w, bias=b,
        momentum=0.3, activation="leaky_relu", activation_param=0.2,
    )  # fmt: skip
    theirs = lambda z: TF.leaky_relu(TF.batch_norm(z, *torch_stats, w, b, True, 0.3), 0.2)  # noqa: E731
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    _compare(ours, theirs, x, [w, b], rtol=tol, atol=tol)
    for a, e in zip(ours_stats, torch_stats):  # the running estimates moved the same way
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)
    # eval: the running estimates normalize
    ours = lambda z: F.norm_act(z, running_mean=ours_stats[0], running_var=ours_stats[1], training=False)  # noqa: E731
    theirs = lambda z: TF.relu(TF.batch_norm(z, *torch_stats, None, None, False))  # noqa: E731
    torch.testing.assert_close(ours(x), theirs(x), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_norm_act_group_is_group_norm_then_the_activation(dtype):
    x = torch.randn(3, 6, 5, 4, dtype=dtype) * 2 + 1
    w, b = _params(6, dtype)
    slopes = torch.linspace(0.05, 0.3, 6, dtype=dtype).requires_grad_()
    ours = lambda z: F.norm_act(  # noqa: E731
        z, "group", num_groups=3, weight=w, bias=b, activation="prelu", prelu_weight=slopes
    )
    theirs = lambda z: TF.prelu(TF.group_norm(z, 3, w, b), slopes)  # noqa: E731
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    _compare(ours, theirs, x, [w, b, slopes], rtol=tol, atol=tol)


def test_norm_act_in_place_writes_over_its_input():
    x = torch.randn(4, 3, 5, 5)
    expected = TF.elu(TF.group_norm(x, 3), 1.0)
    leaf = x.clone().requires_grad_()
    inner = leaf * 1.0  # in place needs a non-leaf input, as after a convolution
    y = F.norm_act(inner, "group", num_groups=3, activation="elu", inplace=True)
    assert y.data_ptr() == inner.data_ptr()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "call",
    [
        lambda z: F.batch_norm_act(z, None, None, training=True, activation="leaky_relu", inplace=True),
        lambda z: F.group_norm_act(z, 3, activation="elu", inplace=True),
        lambda z: F.norm_act(z, "batch", activation="identity", inplace=True),
        lambda z: F.norm_act(z, "group", num_groups=3, activation="leaky_relu", inplace=True),
    ],
)
def test_the_fused_functionals_refuse_to_overwrite_a_leaf_that_requires_grad(call):
    leaf = torch.randn(4, 3, 5, requires_grad=True)
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="leaf tensor that requires grad"):
        call(leaf)
    assert torch.equal(leaf.detach(), before)  # refused before anything was written
    plain = before.clone()  # a tensor autograd does not track may be overwritten
    assert call(plain).data_ptr() == plain.data_ptr()


def test_norm_act_refuses_what_it_cannot_do():
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="norm='group' needs num_groups"):
        F.norm_act(x, "group")
    with pytest.raises(ValueError, match="norm must be 'batch' or 'group', got 'layer'"):
        F.norm_act(x, "layer")
    with pytest.raises(ValueError, match="activation must be one of"):
        F.norm_act(x, activation="gelu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "call",
    [
        lambda x, **kw: F.batch_norm_act(x, None, None, training=True, **kw),
        lambda x, **kw: F.group_norm_act(x, 2, **kw),
        lambda x, **kw: F.norm_act(x, "batch", **kw),
        lambda x, **kw: F.norm_act(x, "group", num_groups=2, **kw),
    ],
)
def test_prelu_without_slopes_is_refused(call, dtype):
    # float32 CPU went into the kernels with no slopes and crashed the process (float64: a TypeError from torch)
    with pytest.raises(ValueError, match="prelu_weight"):
        call(torch.randn(3, 4, 5, dtype=dtype), activation="prelu")
