"""normlab under PyTorch's toolchain: torch.compile, torch.export, ONNX (+ onnxruntime),
torch.jit.trace, torch.fx, torch.func, forward-mode AD, the meta device and isinstance.

Each test runs the same model or functional built from torch.nn and from normlab and
compares what the tool gives, so "works" means "works as torch.nn does".
"""

from __future__ import annotations

import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.func import grad, hessian, jacrev, jvp, vmap

import normlab as nl

# every test here runs on the kernels and on torch's ops (export, jit.trace and torch.func
# take torch's ops whatever the backend; the composed ops would repeat the native runs at the
# cost of CI time: the composed path is covered by the torch suite, the layers and the fuzzer)
pytestmark = [pytest.mark.usefixtures("backend"), pytest.mark.backends("kernels", "native")]


def _cnn(lib, *, act: bool = False, rms: bool = True) -> nn.Sequential:
    """A small CNN with every channel-norm family, then LayerNorm and RMSNorm on features."""
    bn_act = nl.nn.BatchNormAct2d(8, activation="leaky_relu") if act else lib.BatchNorm2d(8)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        lib.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        bn_act,
        nn.Conv2d(8, 8, 3, padding=1),
        lib.GroupNorm(2, 8),
        nn.Conv2d(8, 8, 3, padding=1),
        lib.InstanceNorm2d(8, affine=True),
        nn.Flatten(1),
        lib.LayerNorm(8 * 6 * 6),
        lib.RMSNorm(8 * 6 * 6) if rms else nn.Identity(),
        nn.Linear(8 * 6 * 6, 5),
    )


def _pair(act: bool = False, rms: bool = True):
    """normlab's model and torch.nn's with the same weights (BatchNormAct's activation
    module holds no state for leaky_relu, so the state dicts line up)."""
    torch.manual_seed(0)
    ours = _cnn(nl.nn, act=act, rms=rms)
    theirs = _cnn(nn, rms=rms)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --- isinstance -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (lambda: nl.nn.BatchNorm1d(3), nn.BatchNorm1d),
        (lambda: nl.nn.BatchNorm2d(3), nn.BatchNorm2d),
        (lambda: nl.nn.BatchNorm3d(3), nn.BatchNorm3d),
        (lambda: nl.nn.BatchNormAct2d(3), nn.BatchNorm2d),
        (lambda: nl.nn.BatchRenorm2d(3), nn.BatchNorm2d),
        (lambda: nl.nn.InstanceNorm2d(3), nn.InstanceNorm2d),
        (lambda: nl.nn.GroupNorm(1, 3), nn.GroupNorm),
        (lambda: nl.nn.GroupNormAct(1, 3), nn.GroupNorm),
        (lambda: nl.nn.LayerNorm(3), nn.LayerNorm),
        (lambda: nl.nn.RMSNorm(3), nn.RMSNorm),
        (lambda: nl.nn.SyncBatchNorm(3), nn.modules.batchnorm._BatchNorm),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_layers_are_instances_of_torch_nn(ours, theirs):
    layer = ours()
    assert isinstance(layer, theirs)
    # the weight-decay split every training script writes finds the norm parameters
    no_decay = [
        p
        for m in [layer]
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm))
        for p in m.parameters(recurse=False)
    ]
    assert len(no_decay) == len(list(layer.parameters(recurse=False)))


def test_sync_batchnorm_is_not_torch_syncbatchnorm_so_ddp_accepts_it_on_cpu():
    assert not isinstance(nl.nn.SyncBatchNorm(3), nn.SyncBatchNorm)


def test_torch_model_tools_accept_normlab_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nl.nn.BatchNorm2d(4)).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    _close(torch.nn.utils.fusion.fuse_conv_bn_eval(model[0], model[1])(x), model(x))
    # fuse_modules keys its table by exact type: normlab's classes are one entry away
    from torch.ao.quantization.fuser_method_mappings import fuse_conv_bn

    mapping = {"additional_fuser_method_mapping": {(nn.Conv2d, nl.nn.BatchNorm2d): fuse_conv_bn}}
    fused = torch.ao.quantization.fuse_modules(model, [["0", "1"]], fuse_custom_config_dict=mapping)
    _close(fused(x), model(x))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nl.nn.BatchNorm2d(4)))
    assert isinstance(synced[0], nn.SyncBatchNorm)


# --- torch.compile --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compile_fullgraph_no_graph_breaks_and_equal_to_eager(mode):
    ours, _ = _pair(act=True)
    getattr(ours, mode)()
    x = torch.randn(4, 3, 6, 6)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(ours)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

    eager = _cnn(nl.nn, act=True)
    eager.load_state_dict(ours.state_dict())
    getattr(eager, mode)()
    compiled = torch.compile(ours, fullgraph=True)
    for _ in range(2):  # two steps: the second uses running statistics the first updated
        y_c, y_e = compiled(x), eager(x)
        _close(y_c, y_e)
        y_c.square().sum().backward()
        y_e.square().sum().backward()
    for p, q in zip(ours.parameters(), eager.parameters()):
        _close(p.grad, q.grad, 1e-4)
    for b, c in zip(ours.buffers(), eager.buffers()):
        _close(b, c)


@pytest.mark.slow
def test_compile_recompiles_across_batch_sizes_no_more_than_torch_nn():
    counts = {}
    for name, lib in (("torch", nn), ("normlab", nl.nn)):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = _cnn(lib)
        compiled = torch.compile(model, fullgraph=True)
        for mode in ("train", "eval"):
            getattr(model, mode)()
            for n in (2, 3, 4, 5, 8):
                compiled(torch.randn(n, 3, 6, 6))
        counts[name] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert counts["normlab"] <= counts["torch"], counts


def test_normlab_ops_have_fake_kernels_for_the_meta_device():
    for layer, shape in [
        (nl.nn.BatchNorm2d(4), (2, 4, 3, 3)),
        (nl.nn.BatchNormAct2d(4, activation="elu"), (2, 4, 3, 3)),
        (nl.nn.GroupNorm(2, 4), (2, 4, 3, 3)),
        (nl.nn.InstanceNorm1d(4, affine=True, track_running_stats=True), (2, 4, 5)),
        (nl.nn.LayerNorm(5), (2, 3, 5)),
        (nl.nn.RMSNorm(5), (2, 3, 5)),
        (nl.nn.BatchRenorm2d(4), (2, 4, 3, 3)),
    ]:
        layer = layer.to("meta")
        x = torch.randn(shape, device="meta", requires_grad=True)
        y = layer(x)
        assert y.device.type == "meta" and y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape
    # the kernels' operators themselves, with FakeTensor-style shape propagation
    x = torch.empty(2, 4, 3, 3, device="meta")
    y, shift, offset, rstd, mean, var = torch.ops.normlab.channel_norm(x, None, None, None, None, None, 2, 1e-5, 0, 0.0)
    assert y.shape == x.shape and mean.shape == (4,)


# --- export, ONNX, jit.trace, fx ----------------------------------------------------------------


def test_export_holds_torch_native_norm_ops():
    ours, _ = _pair()
    ours.eval()
    x = torch.randn(4, 3, 6, 6)
    program = torch.export.export(ours, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("normlab" in t for t in targets), targets
    assert {"aten.batch_norm.default", "aten.group_norm.default", "aten.layer_norm.default"} <= targets
    _close(program.module()(x), ours(x))


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
def test_onnx_export_gives_torch_nn_nodes_and_runs_in_onnxruntime(dynamo):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    # torch's TorchScript-based exporter has no RMSNorm (aten::rms_norm), for torch.nn either
    ours, theirs = _pair(rms=dynamo)
    ours.eval()
    theirs.eval()
    x = torch.randn(4, 3, 6, 6)
    graphs = {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
            else:
                buffer = io.BytesIO()
                torch.onnx.export(model, (x,), buffer, dynamo=False)
                proto = onnx.load_from_string(buffer.getvalue())
        session = ort.InferenceSession(proto.SerializeToString())
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        _close(torch.from_numpy(out), ours(x))
        graphs[name] = sorted(node.op_type for node in proto.graph.node)
    assert graphs["ours"] == graphs["theirs"]
    assert "LayerNormalization" in graphs["ours"]


def test_layer_norm2d_exports_with_a_dynamic_batch_axis_in_the_torchscript_exporter():
    """timm's LayerNorm2d exports here; normlab's passed x.shape[1], a traced value, as the
    normalized shape (SymbolicValueError once the batch axis is dynamic)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    layer = nl.nn.LayerNorm2d(8).eval()
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            layer,
            (torch.randn(2, 8, 4, 4),),
            buffer,
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    session = ort.InferenceSession(buffer.getvalue())
    x = torch.randn(5, 8, 4, 4)
    _close(torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), layer(x))


def test_jit_trace_saves_loads_and_runs_at_another_batch_size():
    ours, _ = _pair()
    ours.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(ours, torch.randn(4, 3, 6, 6))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(7, 3, 6, 6)
    _close(loaded(x), ours(x))


def test_fx_symbolic_trace_keeps_layers_as_leaves_and_matches_eager():
    ours, _ = _pair(act=True)
    graph_module = torch.fx.symbolic_trace(ours)
    targets = [n.target for n in graph_module.graph.nodes if n.op == "call_module"]
    assert len(targets) == len(list(ours.children()))  # every layer one call_module node
    x = torch.randn(4, 3, 6, 6)
    for mode in ("train", "eval"):  # the mode is not baked into the graph
        getattr(ours, mode)()
        getattr(graph_module, mode)()
        reference = _cnn(nl.nn, act=True)
        reference.load_state_dict(ours.state_dict())
        getattr(reference, mode)()
        _close(graph_module(x), reference(x))


@pytest.mark.xfail(
    torch.torch_version.TorchVersion(torch.__version__) < (2, 14),
    strict=True,
    reason="the forward's annotations are strings (from __future__ import annotations), which torch "
    "2.13's fx records as the placeholders' types and GraphModule.__reduce__ cannot import (2.14 can)",
)
@pytest.mark.parametrize("name", ["LayerNorm", "GroupNorm"])
def test_a_graph_module_traced_from_a_layer_pickles_as_torch_nns_does(name):
    args = {"LayerNorm": (3,), "GroupNorm": (2, 4)}[name]
    x = torch.randn(2, 4, 3)
    for layer in (getattr(nn, name)(*args), getattr(nl.nn, name)(*args)):
        graph_module = pickle.loads(pickle.dumps(torch.fx.symbolic_trace(layer)))
        _close(graph_module(x), layer(x))


def test_fx_traces_the_functionals_as_single_calls():
    def f(x, w, b):
        return nl.functional.group_norm(x, 2, w, b) + nl.functional.layer_norm(x, (3,))

    graph_module = torch.fx.symbolic_trace(f)
    calls = [n for n in graph_module.graph.nodes if n.op == "call_function"]
    assert len(calls) == 3  # group_norm, layer_norm, add
    x, w, b = torch.randn(2, 4, 3), torch.rand(4), torch.randn(4)
    _close(graph_module(x, w, b), f(x, w, b))


# --- torch.func and forward-mode AD ----------------------------------------------------------

_W, _B = torch.rand(4) + 0.5, torch.randn(4)
FUNCTIONALS = {
    "batch_norm": (lambda F: lambda x: F.batch_norm(x, None, None, _W, _B, True), (3, 4, 5)),
    "batch_norm_eval": (
        lambda F: lambda x: F.batch_norm(x, torch.zeros(4), torch.ones(4) * 2, _W, _B, False),
        (3, 4, 5),
    ),
    "instance_norm": (lambda F: lambda x: F.instance_norm(x, weight=_W, bias=_B), (3, 4, 5)),
    "group_norm": (lambda F: lambda x: F.group_norm(x, 2, _W, _B), (3, 4, 5)),
    "layer_norm": (lambda F: lambda x: F.layer_norm(x, (4,), _W, _B), (3, 5, 4)),
    "rms_norm": (lambda F: lambda x: F.rms_norm(x, (4,), _W), (3, 5, 4)),
}


def _fns(name):
    make, shape = FUNCTIONALS[name]
    return make(nl.functional), make(TF), shape


@pytest.mark.parametrize("name", sorted(FUNCTIONALS))
def test_torch_func_transforms_match_torch_nn(name):
    ours, theirs, shape = _fns(name)
    torch.manual_seed(0)
    xs = torch.randn((6,) + shape) * 2 + 1  # float32 CPU: the path that would use the kernels
    x, t = xs[0], torch.randn(shape)
    loss = lambda f: lambda z: f(z).pow(3).sum()  # noqa: E731
    _close(vmap(ours)(xs), vmap(theirs)(xs))
    _close(grad(loss(ours))(x), grad(loss(theirs))(x), 1e-4)
    _close(jacrev(ours)(x), jacrev(theirs)(x), 1e-4)
    _close(jvp(ours, (x,), (t,))[1], jvp(theirs, (x,), (t,))[1], 1e-4)
    # per-sample gradients (DP-SGD): vmap over grad
    _close(vmap(grad(loss(ours)))(xs), vmap(grad(loss(theirs)))(xs), 1e-4)
    small = x[:2]
    _close(hessian(loss(ours))(small), hessian(loss(theirs))(small), 1e-3)


@pytest.mark.parametrize("name", sorted(FUNCTIONALS))
def test_forward_mode_ad_matches_torch_nn(name):
    import torch.autograd.forward_ad as fwAD

    ours, theirs, shape = _fns(name)
    x, t = torch.randn(shape), torch.randn(shape)
    tangents = []
    for f in (ours, theirs):
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent
        assert tangent is not None
        tangents.append(tangent)
    _close(*tangents, 1e-4)


def test_modules_under_functional_call_and_vmap():
    ours, theirs = nl.nn.GroupNorm(2, 4), nn.GroupNorm(2, 4)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    xs = torch.randn(5, 3, 4, 2)
    per_sample = lambda m: vmap(
        grad(lambda p, x: torch.func.functional_call(m, p, (x,)).pow(2).sum()),  # noqa: E731
        in_dims=(None, 0),
    )(params, xs)
    g_ours, g_theirs = per_sample(ours), per_sample(theirs)
    for k in params:
        _close(g_ours[k], g_theirs[k], 1e-4)


# --- off the CPU: torch's kernels, no extra passes ----------------------------------------------


class _CountActivationSized(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts ops whose output is as large as the input: the passes over memory that cost."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        self.count += any(isinstance(t, torch.Tensor) and t.numel() == self.numel for t in flat)
        return out


@pytest.mark.parametrize(
    "name,make,shape",
    [
        ("batchnorm-train", lambda lib: lib.BatchNorm2d(8), (4, 8, 5, 5)),
        ("batchnorm-eval", lambda lib: lib.BatchNorm2d(8).eval(), (4, 8, 5, 5)),
        ("groupnorm", lambda lib: lib.GroupNorm(2, 8), (4, 8, 5, 5)),
        ("layernorm", lambda lib: lib.LayerNorm(8), (4, 5, 8)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_off_cpu_paths_make_no_more_passes_than_torch_nn(name, make, shape):
    """On the meta device (as on CUDA) normlab runs torch's native kernels: forward and
    backward make as many activation-sized passes as torch.nn's layer (1 and 1 or 2)."""
    counts = {}
    for lib_name, lib in (("torch", nn), ("normlab", nl.nn)):
        layer = make(lib).to("meta")
        x = torch.randn(shape, device="meta", requires_grad=True)
        with _CountActivationSized(x.numel()) as forward:
            y = layer(x)
        with _CountActivationSized(x.numel()) as backward:
            y.backward(torch.ones_like(y))
        counts[lib_name] = (forward.count, backward.count)
    assert counts["normlab"] == counts["torch"], counts
    assert counts["normlab"][0] <= 3 and counts["normlab"][1] <= 3


# --- torch.compile: eval BatchNorm as fusable ops, one graph per model -------------------------


def _compiled_graph_count(model: nn.Module, inputs) -> int:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model)
    for x in inputs:
        compiled(x)
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


# the norms whose eps is checked at the first call (per-sample statistics), built from torch.nn or normlab.nn
_PER_SAMPLE_NORMS = pytest.mark.parametrize(
    "make",
    [
        lambda lib: lib.GroupNorm(2, 8),
        lambda lib: lib.LayerNorm([8, 6, 6]),
        lambda lib: lib.RMSNorm([8, 6, 6]),
    ],
    ids=["GroupNorm", "LayerNorm", "RMSNorm"],
)


@pytest.mark.slow
@_PER_SAMPLE_NORMS
def test_compiled_per_sample_norms_compile_as_often_as_torch_nn(make):
    # the eps check runs once at the first call in eager mode; a flag the compiler guarded on
    # would compile the second call again
    inputs = [torch.randn(4, 3, 6, 6), torch.randn(4, 3, 6, 6), torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)]
    counts = {}
    for name, lib in (("torch", nn), ("normlab", nl.nn)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), make(lib), nn.ReLU())
        counts[name] = _compiled_graph_count(model, inputs)
    assert counts["normlab"] == counts["torch"], counts


@pytest.mark.slow
@_PER_SAMPLE_NORMS
def test_an_eager_call_between_compiled_calls_compiles_nothing_more_than_torch_nn(make):
    # the eps check's flag was set by the first eager call: a graph compiled before it guarded
    # on the flag unset, and compiled a second graph after it (a compiled training step with
    # an eager evaluation of the same model between steps)
    x = torch.randn(4, 3, 6, 6)
    counts = {}
    for name, lib in (("torch", nn), ("normlab", nl.nn)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), make(lib), nn.ReLU())
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(model, fullgraph=True)
        compiled(x)
        model(x)
        compiled(x)
        counts[name] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert counts["normlab"] == counts["torch"] == 1, counts


@pytest.mark.slow
def test_compiled_per_sample_norm_still_checks_eps():
    layer = nl.nn.LayerNorm(5)
    layer.eps = -1.0
    with pytest.raises(Exception, match="eps"):
        torch.compile(layer)(torch.randn(2, 5))
    torch._dynamo.reset()


def _large_mean_bn(lib, cls="BatchNorm2d"):
    torch.manual_seed(0)
    layer = getattr(lib, cls)(4).eval()
    with torch.no_grad():
        layer.running_mean.fill_(1e4)
        layer.running_var.fill_(1e-4)
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.uniform_(-1.0, 1.0)
    return layer


@pytest.mark.slow
@pytest.mark.backends("kernels")  # native is torch's accuracy (docs/conventions.md, Backends)
def test_compiled_eval_batchnorm_keeps_accuracy_on_large_mean_data():
    x = (1e4 + 0.01 * torch.randn(8, 4, 5, 5)).requires_grad_()
    ours = _large_mean_bn(nl.nn)
    ref = ((x.double() - 1e4) / torch.sqrt(torch.tensor(1e-4 + 1e-5, dtype=torch.float64))).mul(
        ours.weight.double().view(1, -1, 1, 1)
    ) + ours.bias.double().view(1, -1, 1, 1)
    torch._dynamo.reset()
    y = torch.compile(ours, fullgraph=True)(x)
    assert (y.double() - ref).abs().max().item() < 1e-6
    # the data is demanding: the form x·s + (β − μ·s) of torch's eager eval kernel loses here
    theirs = _large_mean_bn(nn)
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (theirs(x).double() - ref).abs().max().item() > 1e-3

    # gradients as eager's (the kernels' closed-form backward): x, γ and β
    y.square().sum().backward()
    compiled_grads = [x.grad.clone(), ours.weight.grad.clone(), ours.bias.grad.clone()]
    x.grad = ours.weight.grad = ours.bias.grad = None
    ours(x).square().sum().backward()
    for c, e in zip(compiled_grads, [x.grad, ours.weight.grad, ours.bias.grad]):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-3)
    assert ours.running_mean.grad is None and not ours.running_mean.requires_grad


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu", "prelu"])
def test_compiled_eval_batchnorm_act_equals_eager_in_one_graph(activation):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nl.nn.BatchNormAct2d(4, activation=activation)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 6, 6)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    # pointwise ops the compiler can fuse with the convolution's output, no opaque operator
    targets = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert not any("normlab" in t for t in targets), targets
    compiled = torch.compile(model, fullgraph=True)
    y_c = compiled(x)
    _close(y_c, model(x))
    y_c.square().sum().backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for c, p in zip(compiled_grads, model.parameters()):
        _close(c, p.grad, 1e-4)
