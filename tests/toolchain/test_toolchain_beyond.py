"""The norms beyond the classic five under PyTorch's toolchain, as tests/toolchain/test_toolchain.py checks
the classic ones: torch.compile(fullgraph=True), torch.export, ONNX in onnxruntime (both
exporters), torch.jit.trace, torch.fx, torch.func, forward-mode AD and the meta device.

One table of layers; every check runs over all of it and compares what the tool gives with the
same layer in eager mode."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

import normlab as nl


class _QK(nn.Module):
    """QKNorm inside the smallest attention-like use: q and k from one input."""

    def __init__(self, kind):
        super().__init__()
        self.qk = nl.nn.QKNorm(5, kind)

    def forward(self, x):
        q, k = self.qk(x, 2 * x + 1)
        return q * k


LAYERS = {
    "StdConv2d": (lambda: nl.nn.StdConv2d(4, 6, 3, bias=True), (2, 4, 6, 6)),
    "StdConv2d-same": (lambda: nl.nn.StdConv2d(4, 6, 3, stride=2, padding="same"), (2, 4, 7, 6)),
    "ScaledStdConv2d": (lambda: nl.nn.ScaledStdConv2d(4, 6, 3), (2, 4, 6, 6)),
    "FilterResponseNorm2d": (lambda: nl.nn.FilterResponseNorm2d(4), (2, 4, 3, 5)),
    "FilterResponseNormTlu2d": (lambda: nl.nn.FilterResponseNormTlu2d(4), (2, 4, 3, 5)),
    "FilterResponseNormAct2d": (lambda: nl.nn.FilterResponseNormAct2d(4, act_layer=nn.SiLU), (2, 4, 3, 5)),
    "TLU": (lambda: nl.nn.TLU(4), (2, 4, 3, 5)),
    "EvoNormB0": (lambda: nl.nn.EvoNormB0(4), (3, 4, 3, 3)),
    "EvoNormB1": (lambda: nl.nn.EvoNormB1(4), (3, 4, 3, 3)),
    "EvoNormB2": (lambda: nl.nn.EvoNormB2(4), (3, 4, 3, 3)),
    "EvoNormS0": (lambda: nl.nn.EvoNormS0(4, groups=2), (3, 4, 3, 3)),
    "EvoNormS0a": (lambda: nl.nn.EvoNormS0a(4, group_size=2), (3, 4, 3, 3)),
    "EvoNormS1": (lambda: nl.nn.EvoNormS1(4, groups=2), (3, 4, 3, 3)),
    "EvoNormS2a": (lambda: nl.nn.EvoNormS2a(4, groups=2), (3, 4, 3, 3)),
    "SwitchableNorm2d": (lambda: nl.nn.SwitchableNorm2d(4), (3, 4, 3, 3)),
    "DyT": (lambda: nl.nn.DyT(5), (2, 3, 5)),
    "DyT-channels-first": (lambda: nl.nn.DyT(4, channels_last=False), (2, 4, 3, 3)),
    "Derf": (lambda: nl.nn.Derf(5, shift_init_value=0.1), (2, 3, 5)),
    "ScaleNorm": (lambda: nl.nn.ScaleNorm(5), (2, 3, 5)),
    "QKNorm-rms": (lambda: _QK("rms"), (2, 3, 5)),
    "QKNorm-layer": (lambda: _QK("layer"), (2, 3, 5)),
    "QKNorm-l2": (lambda: _QK("l2"), (2, 3, 5)),
}
NAMES = sorted(LAYERS)
#: layers whose training call updates running statistics (torch.func transforms refuse those, as
#: they refuse torch.nn.BatchNorm2d in training)
STATEFUL = {"EvoNormB0", "EvoNormB1", "EvoNormB2", "SwitchableNorm2d"}


def _layer(name, seed=0):
    torch.manual_seed(seed)
    module = LAYERS[name][0]()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return module


def _input(name, batch=None, seed=1):
    shape = LAYERS[name][1]
    if batch is not None:
        shape = (batch,) + shape[1:]
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.2


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", NAMES)
def test_is_a_norm_layer_where_it_is_one(name):
    layer = _layer(name)
    convs = ("StdConv2d", "StdConv2d-same", "ScaledStdConv2d")
    if name in convs:
        assert isinstance(layer, nn.Conv2d) and not nl.nn.is_norm_layer(layer)
    elif name.startswith("QKNorm"):
        assert all(nl.nn.is_norm_layer(m) for m in layer.qk.children())
    elif name != "TLU":
        assert nl.nn.is_norm_layer(layer)


# --- torch.compile ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, mode", [(n, "train") for n in NAMES] + [(n, "eval") for n in sorted(STATEFUL)], ids=lambda v: v
)
def test_compile_fullgraph_one_graph_and_equal_to_eager(name, mode):
    """Training mode for every layer; eval too where it differs (running statistics)."""
    ours = getattr(_layer(name), mode)()
    eager = copy.deepcopy(ours)
    x = _input(name)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(copy.deepcopy(ours))(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    compiled = torch.compile(ours, fullgraph=True)
    for _ in range(2):  # the second step uses the statistics the first one updated
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_c, y_e = compiled(xc), eager(xe)
        _close(y_c, y_e)
        y_c.square().sum().backward()
        y_e.square().sum().backward()
        _close(xc.grad, xe.grad, 1e-4)
    for p, q in zip(ours.parameters(), eager.parameters()):
        _close(p.grad, q.grad, 1e-4)
    for b, c in zip(ours.buffers(), eager.buffers()):
        _close(b, c)


# --- export, ONNX, jit.trace, fx ------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_export_holds_no_normlab_op_and_matches_eager(name):
    ours = _layer(name).eval()
    x = _input(name)
    program = torch.export.export(ours, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("normlab" in t for t in targets), targets
    _close(program.module()(x), ours(x))
    _close(program.module()(_input(name, seed=5)), ours(_input(name, seed=5)))


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
@pytest.mark.parametrize("name", NAMES)
def test_onnx_export_runs_in_onnxruntime(name, dynamo):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    ours = _layer(name).eval()
    x = _input(name)
    if name == "QKNorm-rms" and not dynamo:
        # torch's TorchScript-based exporter has no aten::rms_norm, for torch.nn.RMSNorm either
        for model in (ours, nn.RMSNorm(5)):
            with pytest.raises(torch.onnx.errors.UnsupportedOperatorError, match="rms_norm"):
                torch.onnx.export(model, (x,), io.BytesIO(), dynamo=False)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            proto = torch.onnx.export(ours, (x,), dynamo=True, verbose=False).model_proto
        else:
            buffer = io.BytesIO()
            torch.onnx.export(ours, (x,), buffer, dynamo=False)
            proto = onnx.load_from_string(buffer.getvalue())
    session = ort.InferenceSession(proto.SerializeToString())
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    _close(torch.from_numpy(out), ours(x), 1e-4)
    ops = {node.op_type for node in proto.graph.node}
    if name.startswith("StdConv") or name == "ScaledStdConv2d":
        assert "LayerNormalization" in ops or dynamo is False  # the weight's row norm, as torch.nn's


@pytest.mark.parametrize("name", NAMES)
def test_jit_trace_runs_at_another_batch_size(name):
    ours = _layer(name).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(ours, _input(name))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = _input(name, batch=5, seed=3)
    _close(loaded(x), ours(x))


@pytest.mark.parametrize("name", NAMES)
def test_fx_keeps_the_layer_a_leaf_and_the_mode_unbaked(name):
    model = nn.Sequential(nn.Identity(), _layer(name))
    graph_module = torch.fx.symbolic_trace(model)
    if not name.startswith("QKNorm"):
        targets = [n.target for n in graph_module.graph.nodes if n.op == "call_module"]
        assert targets == ["0", "1"], targets
    x = _input(name)
    for mode in ("train", "eval"):
        reference = copy.deepcopy(model)
        getattr(graph_module, mode)()
        getattr(reference, mode)()
        _close(graph_module(x), reference(x))


# --- torch.func and forward-mode AD ------------------------------------------------------------------


def _transformable(name, mode):
    return mode == "eval" or name not in STATEFUL


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_torch_func_transforms_match_autograd(name, mode):
    if not _transformable(name, mode):
        pytest.skip("training updates running statistics in place: torch.func refuses it, as for torch.nn's BatchNorm")
    layer = getattr(_layer(name), mode)()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = _input(name)
    xs = torch.stack([_input(name, seed=s) for s in range(3)])

    def f(z):
        return functional_call(layer, params, (z,))

    def loss(z):
        return f(z).pow(3).sum()

    _close(vmap(f)(xs), torch.stack([f(z) for z in xs]))
    xg = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(loss(xg), xg)
    _close(grad(loss)(x), expected, 1e-4)
    jac = torch.autograd.functional.jacobian(f, x)
    _close(jacrev(f)(x), jac, 1e-4)
    t = torch.randn_like(x)
    along = (jac.reshape(-1, x.numel()) @ t.reshape(-1)).reshape(jac.shape[: jac.dim() - x.dim()])
    _close(jvp(f, (x,), (t,))[1], along, 1e-4)
    _close(vmap(grad(loss))(xs), torch.stack([grad(loss)(z) for z in xs]), 1e-4)

    # per-sample parameter gradients (DP-SGD): vmap over grad with respect to the parameters
    def param_loss(p, z):
        return functional_call(layer, p, (z,)).pow(2).sum()

    per_sample = vmap(grad(param_loss), in_dims=(None, 0))(params, xs)
    for k in params:
        _close(per_sample[k], torch.stack([grad(param_loss)(params, z)[k] for z in xs]), 1e-4)

    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent
    _close(tangent, along, 1e-4)


# --- the meta device ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_runs_on_the_meta_device(name, mode):
    layer = getattr(_layer(name), mode)().to("meta")
    x = torch.empty(LAYERS[name][1], device="meta", requires_grad=True)
    y = layer(x)
    expected = getattr(_layer(name), mode)()(_input(name))
    assert y.device.type == "meta" and y.shape == expected.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and p.grad.shape == p.shape for p in layer.parameters())
