"""add_layer_norm / add_rms_norm and AddLayerNorm / AddRMSNorm: ``(norm(x + r), x + r)``
against a float64 torch composition on every path (kernel, composed, native), gradients
through both outputs, second derivatives, what backward keeps, the toolchain (compile,
export, fx, vmap, meta), and the errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.func import grad, vmap

import normlab as nl
from normlab import core

# every test here runs once per backend (conftest.BACKENDS)
pytestmark = [pytest.mark.usefixtures("backend"), pytest.mark.with_triton]

KERNELS = core.kernels_available()
SHAPES = [(8, 16), (2, 3, 33), (5, 1100)]  # odd widths; 1100 crosses the kernels' 512-float blocks


def _params(k, centered, affine):
    w = (torch.rand(k) + 0.5).requires_grad_() if affine in ("both", "weight") else None
    b = torch.randn(k).requires_grad_() if centered and affine in ("both", "bias") else None
    return w, b


def _ours(centered, w, b, eps=1e-5):
    if centered:
        return lambda x, r: nl.functional.add_layer_norm(x, r, (x.shape[-1],), w, b, eps)
    return lambda x, r: nl.functional.add_rms_norm(x, r, (x.shape[-1],), w, eps)


def _torch(centered, w, b, eps=1e-5):
    """The unfused composition in float64."""

    def fn(x, r):
        s = x + r
        ww = None if w is None else w.double()
        if centered:
            return TF.layer_norm(s, (s.shape[-1],), ww, None if b is None else b.double(), eps), s
        return TF.rms_norm(s, (s.shape[-1],), ww, eps), s

    return fn


def _run(fn, x, r, params, dy, ds):
    """Outputs and the gradients of x, r and the parameters, both outputs in the loss."""
    x = x.detach().clone().requires_grad_()
    r = r.detach().clone().requires_grad_()
    y, s = fn(x, r)
    loss = (y * dy).sum() + (s * ds).sum()
    return (y, s, *torch.autograd.grad(loss, [x, r, *params]))


def _inputs(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 2 + 3  # a mean away from 0: the shifted moments matter
    r = torch.randn(shape, generator=g)
    return x, r, torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _close(got, want, tol=2e-5):
    for a, e in zip(got, want):
        assert a.shape == e.shape
        torch.testing.assert_close(a.double(), e.double(), rtol=tol, atol=tol * max(1.0, e.abs().max().item()))


def _paths(fn, *args):
    with core.record_dispatch() as log:
        fn(*args)
    return [path for _, path, _ in log]


@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("centered", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_values_and_gradients_of_both_outputs_match_float64(shape, centered, affine, backend):
    x, r, dy, ds = _inputs(shape)
    w, b = _params(shape[-1], centered, affine)
    params = [p for p in (w, b) if p is not None]
    got = _run(_ours(centered, w, b), x, r, params, dy, ds)
    paths = _paths(_ours(centered, w, b), x, r)
    want = _run(_torch(centered, w, b), x.double(), r.double(), params, dy.double(), ds.double())
    assert got[0].dtype == got[1].dtype == torch.float32
    assert paths == [{"kernels": "kernels" if KERNELS else "composed"}.get(backend, backend)]
    _close(got, want)
    torch.testing.assert_close(got[1], x + r, rtol=0, atol=0)  # the sum is exact


@pytest.mark.parametrize("centered", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("used", ["normed", "summed"])
def test_one_output_alone(centered, used):
    """A gradient reaching only one output: the other's is zero, not garbage."""
    x, r, dy, ds = _inputs((6, 40))
    w, b = _params(40, centered, "both")
    params = [p for p in (w, b) if p is not None]
    dy, ds = (dy, torch.zeros_like(ds)) if used == "normed" else (torch.zeros_like(dy), ds)
    xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
    y, s = _ours(centered, w, b)(xg, rg)
    out = (y * dy).sum() if used == "normed" else (s * ds).sum()
    got = torch.autograd.grad(out, [xg, rg, *params], allow_unused=True, materialize_grads=True)
    want = _run(_torch(centered, w, b), x.double(), r.double(), params, dy.double(), ds.double())[2:]
    _close(got, want)


def test_residual_that_broadcasts_and_float64_take_torchs_sum(backend):
    x, r, _, _ = _inputs((4, 3, 24))
    w, b = _params(24, True, "both")
    bias_row = torch.randn(24)
    y, s = nl.functional.add_layer_norm(x, bias_row, 24, w, b)
    torch.testing.assert_close(s, x + bias_row)
    torch.testing.assert_close(y, TF.layer_norm(x + bias_row, (24,), w, b))
    xd, rd = x.double().requires_grad_(), r.double().requires_grad_()
    wd, bd = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    assert _paths(_ours(True, wd, bd), xd, rd) == ["composed" if backend == "composed" else "native"]
    assert torch.autograd.gradcheck(lambda a, c, p, q: nl.functional.add_layer_norm(a, c, 24, p, q), (xd, rd, wd, bd))
    assert torch.autograd.gradcheck(lambda a, c, p: nl.functional.add_rms_norm(a, c, 24, p), (xd, rd, wd))
    assert torch.autograd.gradgradcheck(lambda a, c, p: nl.functional.add_rms_norm(a, c, 24, p), (xd, rd, wd))


@pytest.mark.parametrize("centered", [True, False], ids=["layer", "rms"])
def test_gradcheck_composed_float64(centered):
    x, r, _, _ = _inputs((3, 10))
    w, b = _params(10, centered, "both")
    args = [t.detach().double().requires_grad_() for t in (x, r, w) + ((b,) if centered else ())]
    with core.use_backend("composed"):
        assert torch.autograd.gradcheck(
            lambda *a: _ours(centered, *a[2:], *((None,) if not centered else ()))(*a[:2]), args
        )


@pytest.mark.skipif(not KERNELS, reason="kernels unavailable here")
@pytest.mark.parametrize("centered", [True, False], ids=["layer", "rms"])
def test_kernels_composed_and_native_agree_and_second_derivatives(centered):
    x, r, dy, ds = _inputs((7, 48))
    w, b = _params(48, centered, "both")
    params = [p for p in (w, b) if p is not None]
    kernels = _run(_ours(centered, w, b), x, r, params, dy, ds)
    with core.use_backend("composed"):
        composed = _run(_ours(centered, w, b), x, r, params, dy, ds)

    def torch_float32(a, c):
        s = a + c
        return (TF.layer_norm(s, (48,), w, b) if centered else TF.rms_norm(s, (48,), w)), s

    unfused = _run(torch_float32, x, r, params, dy, ds)
    _close(kernels, composed)
    _close(kernels, unfused)

    # create_graph through the kernel path: the gradient of a gradient norm
    def second(fn, dtype):
        xx, rr = x.to(dtype).requires_grad_(), r.to(dtype).requires_grad_()
        y, s = fn(xx, rr)
        (gx,) = torch.autograd.grad((y * dy.to(dtype)).sum() + (s.sin()).sum(), xx, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), [xx, rr])

    _close(second(_ours(centered, w, b), torch.float32), second(_torch(centered, w, b), torch.float64), 1e-4)


_SECOND_ORDER_WITH_PARAMETERS = """
import torch, normlab as nl
import torch.nn.functional as TF
torch.manual_seed(0)
centered = {centered}
x, r, dy = torch.randn(5, 16), torch.randn(5, 16), torch.randn(5, 16)
w, b = torch.randn(16), torch.randn(16)

def run(dtype, fused):
    a = [t.to(dtype).requires_grad_() for t in ((x, r, w, b) if centered else (x, r, w))]
    if fused:
        y, s = (nl.functional.add_layer_norm if centered else nl.functional.add_rms_norm)(a[0], a[1], (16,), *a[2:])
    else:
        s = a[0] + a[1]
        y = TF.layer_norm(s, (16,), *a[2:]) if centered else TF.rms_norm(s, (16,), a[2])
    g = torch.autograd.grad((y * dy.to(dtype)).sum() + s.sin().sum(), [a[0], a[2]], create_graph=True)
    h = torch.autograd.grad(sum(t.square().sum() for t in g), a, allow_unused=True)
    return [torch.zeros_like(t) if d is None else d for t, d in zip(a, h)]

ours, ref = run(torch.float32, True), run(torch.float64, False)
for o, e in zip(ours, ref):
    torch.testing.assert_close(o.double(), e, rtol=1e-4, atol=1e-4)
print("ok")
"""


@pytest.mark.skipif(not KERNELS, reason="kernels unavailable here")
@pytest.mark.parametrize("centered", [True, False], ids=["layer", "rms"])
def test_second_derivatives_with_the_parameters_among_the_inputs_do_not_deadlock(centered):
    # The kernels' autograd node held its lock through the double backward, which re-enters
    # the node (add + norm differentiates its own saved sum, whose graph leads back to it on
    # the way to γ): a gradient of a gradient taken with γ among the inputs hung forever. A
    # subprocess, so that a regression fails on the timeout instead of hanging the suite.
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _SECOND_ORDER_WITH_PARAMETERS.format(centered=centered)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_backward_keeps_no_more_than_the_unfused_ops():
    x, r, _, _ = _inputs((64, 768))
    xg, rg = x.requires_grad_(), r.clone().requires_grad_()
    fused, unfused = nl.nn.AddLayerNorm(768), nn.LayerNorm(768)

    def kept(fn):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(v for v in storages.values() if v >= x.numel())  # activation-sized: not γ, β, statistics

    ours = kept(lambda: fused(xg, rg))
    theirs = kept(lambda: unfused(xg + rg))
    assert 0 < ours <= theirs, (ours, theirs)


def test_modules_share_state_dict_with_layernorm_and_rmsnorm_and_trace():
    ln, rms = nl.nn.AddLayerNorm(12, eps=1e-6), nl.nn.AddRMSNorm(12, eps=1e-6)
    assert isinstance(ln, nn.LayerNorm) and isinstance(rms, nn.RMSNorm)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
        rms.weight.uniform_(0.5, 1.5)
    plain_ln, plain_rms = nn.LayerNorm(12, eps=1e-6), nn.RMSNorm(12, eps=1e-6)
    plain_ln.load_state_dict(ln.state_dict())
    plain_rms.load_state_dict(rms.state_dict())
    x, r = torch.randn(3, 5, 12), torch.randn(3, 5, 12)
    for fused, plain in ((ln, plain_ln), (rms, plain_rms)):
        y, s = fused(x, r)
        torch.testing.assert_close(s, x + r)
        torch.testing.assert_close(y, plain(x + r), rtol=1e-5, atol=1e-5)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.norm = nn.Linear(12, 12), nl.nn.AddRMSNorm(12)

        def forward(self, x, r):
            y, s = self.norm(self.fc(x), r)
            return y + s

    block = Block()
    traced = torch.fx.symbolic_trace(block)
    assert any(n.op == "call_module" and n.target == "norm" for n in traced.graph.nodes)
    torch.testing.assert_close(traced(x, r), block(x, r))


def test_compile_fullgraph_no_graph_breaks_export_and_meta():
    norm = nl.nn.AddLayerNorm(16)
    x, r = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(norm)(x, r)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(norm, fullgraph=True)
    got = compiled(x, r)
    want = norm(x, r)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    g_c = torch.autograd.grad(got[0].sin().sum() + got[1].square().sum(), [x, r, norm.weight])
    g_e = torch.autograd.grad(want[0].sin().sum() + want[1].square().sum(), [x, r, norm.weight])
    for a, e in zip(g_c, g_e):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)

    program = torch.export.export(norm, (x.detach(), r.detach()))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.layer_norm.default" in targets and not any("normlab" in t for t in targets), targets
    for a, e in zip(program.module()(x, r), want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)

    meta = nl.nn.AddRMSNorm(16).to("meta")
    xm = torch.empty(4, 16, device="meta", requires_grad=True)
    y, s = meta(xm, torch.empty(4, 16, device="meta"))
    assert y.device.type == s.device.type == "meta" and y.shape == s.shape == (4, 16)
    (y.sum() + s.sum()).backward()
    assert xm.grad.shape == (4, 16)
    outs = torch.ops.normlab.add_row_norm(
        torch.empty(3, 8, device="meta"), torch.empty(3, 8, device="meta"), None, None, 8, 1e-5, True
    )
    assert [tuple(o.shape) for o in outs] == [(3, 8), (3, 8), (3,), (3,), (3,)]


@pytest.mark.parametrize("centered", [True, False], ids=["layer", "rms"])
def test_vmap_and_grad_match_a_loop(centered):
    x, r, _, _ = _inputs((5, 3, 20))
    w, b = _params(20, centered, "both")
    fn = _ours(centered, w, b)

    def loss(a, c):
        y, s = fn(a, c)
        return (y.sin() + s.cos()).sum()

    per_sample = vmap(grad(loss, argnums=(0, 1)))(x, r)
    for i in range(5):
        xi, ri = x[i].clone().requires_grad_(), r[i].clone().requires_grad_()
        want = torch.autograd.grad(loss(xi, ri), [xi, ri])
        for a, e in zip((per_sample[0][i], per_sample[1][i]), want):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    _, ss = vmap(fn)(x, r)
    torch.testing.assert_close(ss, x + r)


def test_errors_name_what_was_expected():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="residual of shape"):
        nl.functional.add_layer_norm(x, torch.randn(4, 9), 8)
    with pytest.raises(ValueError, match="residual of shape"):
        nl.functional.add_rms_norm(torch.randn(8), torch.randn(4, 8), 8)
    with pytest.raises(ValueError, match="trailing dims"):
        nl.functional.add_layer_norm(x, x, 6)
    with pytest.raises(TypeError, match="residual must be"):
        nl.functional.add_layer_norm(x, 1.0, 8)
    with pytest.raises(ValueError, match="weight has shape"):
        nl.functional.add_rms_norm(x, x, 8, torch.ones(6))
    with pytest.raises(ValueError, match="residual of shape"):
        nl.nn.AddLayerNorm(8)(x, torch.randn(3, 8))
