"""Eager calls on the kernels' direct entries against the registered operators.

An eager float32 CPU call runs the kernels from C++ (entries.cpp) — forward, running-estimate
update and a C++ autograd node (a torch::autograd::Node, like torch's generated ones,
autograd.cpp) whose backward needs no Python — while traced code calls the
``torch.ops.normlab.*`` operators with their Python autograd formula. Both run the same
kernels, so outputs, every gradient and the running estimates must agree bit for bit; and a
call the direct entry must not take (a mode, a transform) is sent elsewhere by the path rule,
while an error the entry finds is reported by normlab's checks.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil

import pytest
import torch
from torch.overrides import TorchFunctionMode

import normlab as nl
from normlab import core
from normlab.core import paths
from tests.helpers import in_layout

_NOT_EXPECTED = (
    "the composed ops were asked for"
    if core.backend() == "composed"
    else (None if shutil.which(os.environ.get("CXX", "c++")) else "no C++ compiler here")
)
pytestmark = pytest.mark.skipif(_NOT_EXPECTED is not None, reason=_NOT_EXPECTED or "")


@pytest.fixture(autouse=True, scope="module")
def _kernels_built():
    if not core.kernels_available():
        pytest.fail(f"a C++ compiler is here but the kernels did not build: {core.kernels.cpu.status()}")


def _operators_only(patch: pytest.MonkeyPatch) -> None:
    """Route every call through torch.ops.normlab.* (as a mode sees them): the path rule's
    first row is told the tensor is not one the direct entry reads."""
    patch.setattr(paths._cpu.module, "plain_eager", lambda x: False)


def _step(module, x, dy):
    """Output, input and parameter gradients, and the buffers after one call."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(dy)
    grads = [x.grad] + [p.grad for p in module.parameters()]
    node = y.grad_fn
    while node.name().startswith(("CloneBackward", "ContiguousBackward")):  # a layout restored
        node = node.next_functions[0][0]
    return y.detach(), grads, [b.clone() for b in module.buffers()], node


def _bn(**kw):
    return lambda: nl.nn.BatchNorm2d(4, **kw)


CASES = {
    "bn2d": (_bn(), (3, 4, 5, 5)),
    "bn2d-affine-off": (_bn(affine=False), (3, 4, 5, 5)),
    "bn2d-no-bias": (_bn(bias=False), (3, 4, 5, 5)),
    "bn2d-cumulative": (_bn(momentum=None), (3, 4, 5, 5)),
    "bn2d-biased-var": (_bn(unbiased_running_var=False), (3, 4, 5, 5)),
    "bn2d-untracked": (_bn(track_running_stats=False), (3, 4, 5, 5)),
    "bn2d-eval": (lambda: nl.nn.BatchNorm2d(4).eval(), (3, 4, 5, 5)),
    "bn2d-frozen": (lambda: nl.nn.BatchNorm2d(4).freeze(affine=False), (3, 4, 5, 5)),
    "bn1d-rows": (lambda: nl.nn.BatchNorm1d(6), (8, 6)),
    "bn1d-seq": (lambda: nl.nn.BatchNorm1d(6), (4, 6, 7)),
    "bn3d": (lambda: nl.nn.BatchNorm3d(3), (2, 3, 3, 4, 5)),
    "gn": (lambda: nl.nn.GroupNorm(2, 4), (3, 4, 5, 5)),
    "gn-instance": (lambda: nl.nn.GroupNorm(4, 4, affine=False), (3, 4, 5, 5)),
    "gn-act-prelu": (lambda: nl.nn.GroupNormAct(2, 4, activation="prelu"), (3, 4, 5, 5)),
    "bn-act-prelu": (lambda: nl.nn.BatchNormAct2d(4, activation="prelu"), (3, 4, 5, 5)),
    "instance-eval": (lambda: nl.nn.InstanceNorm2d(4, affine=True, track_running_stats=True).eval(), (3, 4, 5, 5)),
    "ln": (lambda: nl.nn.LayerNorm((4, 5, 5)), (3, 4, 5, 5)),
    "ln-last": (lambda: nl.nn.LayerNorm(5, bias=False), (3, 4, 5, 5)),
    "ln-affine-off": (lambda: nl.nn.LayerNorm(5, elementwise_affine=False), (3, 4, 5, 5)),
    "rms": (lambda: nl.nn.RMSNorm(5), (3, 4, 5, 5)),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_eager_calls_equal_the_operators_bit_for_bit(case, layout, monkeypatch):
    make, shape = CASES[case]
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
    x = in_layout(torch.randn(shape) * 3 + 1, layout)
    dy = torch.randn(shape)
    eager, reference = layer, copy.deepcopy(layer)
    results = []
    for _ in range(2):  # two steps: the second starts from updated running estimates
        ours = _step(eager, x, dy)
        with monkeypatch.context() as patch:
            _operators_only(patch)
            theirs = _step(reference, x, dy)
        results.append((ours, theirs))
    # RMSNorm on another layout runs torch's op on both sides (the general rule)
    on_kernels = not (case == "rms" and layout != "contiguous")
    for ours, theirs in results:
        if on_kernels:  # the C++ node, where the operators record their own
            assert ours[3].name().startswith("Normlab") and ours[3].name() != theirs[3].name()
        torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
        assert ours[0].stride() == theirs[0].stride()
        for a, b in zip(ours[1] + ours[2], theirs[1] + theirs[2]):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_module_call_is_one_node_whose_backward_needs_no_python():
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    for layer in (nl.nn.BatchNorm2d(4), nl.nn.GroupNorm(2, 4), nl.nn.LayerNorm((4, 3, 3)), nl.nn.RMSNorm(3)):
        y = layer(x)
        # a C++ node (not a Python autograd.Function) straight to the leaves
        assert type(y.grad_fn).__name__ == "CppFunction" and y.grad_fn.name().startswith("Normlab")
        assert {type(f).__name__ for f, _ in y.grad_fn.next_functions if f is not None} == {"AccumulateGrad"}


def test_no_grad_and_inference_mode_record_nothing_and_agree():
    layer = nl.nn.BatchNorm2d(4).eval()
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    with torch.no_grad():
        a = layer(x)
    with torch.inference_mode():
        b = layer(x)
    c = layer(x)
    assert a.grad_fn is None and not a.requires_grad and b.is_inference()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c.detach(), rtol=0, atol=0)


class _Seen(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_a_torch_function_mode_sees_the_call_as_the_registered_operator():
    layer = nl.nn.BatchNorm2d(4)
    x = torch.randn(2, 4, 3, 3)
    expected = copy.deepcopy(layer)(x)
    mode = _Seen()
    with mode, core.record_dispatch() as log:
        y = layer(x)
    assert mode.calls > 0 and log == [("batch_norm", "kernels", "a mode sees the registered operator")]
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_what_the_cpp_entry_refuses_is_reported_by_the_checks():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nl.nn.BatchNorm1d(3)(torch.randn(1, 3))
    layer = nl.nn.BatchNorm2d(3)
    layer.eps = 0.0
    with pytest.raises(ValueError, match="eps must be > 0"):
        layer(torch.randn(2, 3, 2, 2))
    with pytest.raises(TypeError):
        nl.nn.LayerNorm(3)(torch.arange(6).view(2, 3))


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_a_batch_that_is_not_finite_leaves_the_running_estimates(policy):
    layer = nl.nn.BatchNorm2d(2, on_nonfinite=policy)
    layer(torch.randn(4, 2, 3, 3))
    before = [b.clone() for b in layer.buffers()]
    x = torch.randn(4, 2, 3, 3)
    x[0, 1, 0, 0] = float("inf")
    if policy == "skip":
        with pytest.warns(RuntimeWarning, match="not finite"):
            y = layer(x)
        assert torch.isfinite(y[:, 0]).all()
    else:
        with pytest.raises(core.NonFiniteStatisticsError):
            layer(x)
    for b, a in zip(layer.buffers(), before):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: nl.nn.BatchNorm2d(4), (6, 4, 3, 3)),
        (lambda: nl.nn.GroupNorm(2, 4), (6, 4, 3, 3)),
        (lambda: nl.nn.LayerNorm((4, 3, 3)), (6, 4, 3, 3)),
    ],
    ids=["bn", "gn", "ln"],
)
def test_second_derivatives_of_module_calls(make, shape):
    """create_graph=True: the C++ node hands its backward to the composed reference."""
    torch.manual_seed(0)
    layer = make()
    data = torch.randn(shape) * 2 + 1
    results = []
    for backend in ("auto", "composed"):
        with core.use_backend(backend):
            x = data.clone().requires_grad_()
            layer.zero_grad()
            (g,) = torch.autograd.grad(layer(x).pow(3).sum(), x, create_graph=True)
            g.pow(2).sum().backward()
            results.append((g.detach(), x.grad, layer.weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [lambda: nl.nn.BatchNorm2d(4), lambda: nl.nn.LayerNorm(3)], ids=["channel", "row"])
def test_the_cpp_node_keeps_autograd_s_rules(make):
    layer = make()
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    y = layer(x)
    (full,) = torch.autograd.grad(y.sum(), x, retain_graph=True)  # only x asked for
    y.sum().backward(retain_graph=True)
    torch.testing.assert_close(full, x.grad, rtol=0, atol=0)
    y.sum().backward()  # the saved tensors are freed now
    with pytest.raises(RuntimeError, match="second time"):
        y.sum().backward()
    h = x * 1
    z = layer(h)
    h.add_(1)  # the saved input changed
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


# --- compiled autograd: an eager forward whose backward torch._dynamo.compiled_autograd traces

try:
    from torch._dynamo import compiled_autograd as _compiled_autograd

    _NO_COMPILED_AUTOGRAD = None if hasattr(_compiled_autograd, "_enable") else "this torch's compiled autograd differs"
except ImportError:  # a torch without dynamo
    _compiled_autograd, _NO_COMPILED_AUTOGRAD = None, "this torch has no compiled autograd"

_COMPILED_AUTOGRAD_CASES = [
    "bn2d",
    "bn2d-eval",
    "bn2d-affine-off",
    "gn",
    "bn-act-prelu",
    "gn-act-prelu",
    "ln",
    "ln-affine-off",
    "rms",
]


def _gradients(layer, x, weights, backward, *, x_needs_grad=True):
    """The input and parameter gradients of one eager call, `backward` running the backward."""
    x = x.detach().clone().requires_grad_(x_needs_grad)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    assert y.grad_fn.name().startswith("Normlab")  # the C++ node is what gets compiled
    backward((y.square() * weights).sum())
    return [x.grad] + [p.grad for p in layer.parameters()]


def _compiled_backward(backend):
    def backward(loss):
        with _compiled_autograd._enable(torch.compile(backend=backend)):
            loss.backward()

    return backward


def _assert_same_gradients(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(_NO_COMPILED_AUTOGRAD is not None, reason=_NO_COMPILED_AUTOGRAD or "")
@pytest.mark.parametrize(
    "case,layout",
    # RMSNorm on another layout runs torch's op, not the C++ node (the general rule)
    [
        (c, lay)
        for c in _COMPILED_AUTOGRAD_CASES
        for lay in ("contiguous", "channels_last")
        if (c, lay) != ("rms", "channels_last")
    ],
)
def test_compiled_autograd_backward_of_an_eager_call_equals_the_eager_backward(case, layout):
    make, shape = CASES[case]
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
    x = in_layout(torch.randn(shape) * 3 + 1, layout)
    weights = torch.randn(shape)
    try:
        # and with x a leaf that wants no gradient: the parameters' only, where there are any
        for x_needs_grad in (True, False) if list(layer.parameters()) else (True,):
            eager = _gradients(layer, x, weights, torch.Tensor.backward, x_needs_grad=x_needs_grad)
            traced = _gradients(layer, x, weights, _compiled_backward("eager"), x_needs_grad=x_needs_grad)
            _assert_same_gradients(traced, eager)
    finally:
        torch._dynamo.reset()


@pytest.mark.skipif(_NO_COMPILED_AUTOGRAD is not None, reason=_NO_COMPILED_AUTOGRAD or "")
@pytest.mark.parametrize(
    "make,shape,operator",
    [
        (lambda: nl.nn.BatchNorm2d(4), (3, 4, 5, 5), "normlab.channel_norm_backward"),
        (lambda: nl.nn.LayerNorm(5), (3, 4, 5), "normlab.row_norm_backward"),
    ],
    ids=["channel", "row"],
)
def test_compiled_autograd_records_the_registered_backward_operator(make, shape, operator):
    """The traced graph calls normlab's operator (fake kernel while tracing, kernels when run),
    under AOT autograd and inductor as under the eager backend; a new batch size recompiles."""
    from torch._dynamo.backends.common import aot_autograd

    torch.manual_seed(0)
    layer = make()
    graphs = []

    def keep(gm, _example_inputs):
        graphs.append(gm.code)
        return gm

    try:
        for backend in (aot_autograd(fw_compiler=keep), "inductor"):
            for n in (shape[0], shape[0] + 2):
                x = torch.randn(n, *shape[1:])
                weights = torch.randn(x.shape)
                eager = _gradients(layer, x, weights, torch.Tensor.backward)
                _assert_same_gradients(_gradients(layer, x, weights, _compiled_backward(backend)), eager)
            torch._dynamo.reset()
        assert graphs and all(f"torch.ops.{operator}.default(" in code for code in graphs)
    finally:
        torch._dynamo.reset()


@pytest.mark.skipif(_NO_COMPILED_AUTOGRAD is not None, reason=_NO_COMPILED_AUTOGRAD or "")
@pytest.mark.parametrize(
    "make",
    [lambda: nl.nn.BatchNorm2d(4), lambda: nl.nn.GroupNormAct(2, 4, activation="prelu"), lambda: nl.nn.LayerNorm(3)],
    ids=["bn", "gn-prelu", "ln"],
)
def test_compiled_autograd_second_derivatives_equal_the_eager_ones(make):
    """create_graph=True under compiled autograd: the node hands its backward to the composed
    reference there too, so the gradient has a graph to differentiate."""
    torch.manual_seed(0)
    layer = make()
    data = torch.randn(6, 4, 3, 3) * 2 + 1
    results = []
    try:
        for compiled in (False, True):
            x = data.clone().requires_grad_()
            layer.zero_grad(set_to_none=True)
            y = layer(x)
            assert y.grad_fn.name().startswith("Normlab")
            with _compiled_autograd._enable(torch.compile(backend="eager")) if compiled else contextlib.nullcontext():
                (g,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
                g.pow(2).sum().backward()
            results.append([g.detach(), x.grad] + [p.grad for p in layer.parameters()])
    finally:
        torch._dynamo.reset()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_kept_channels_of_the_in_place_mode_match_the_torch_ops_test():
    """The kernels' kept_channels (one call, for every activation but ELU) keeps exactly the
    channels unrecoverable_channels's torch ops keep: γ near the guard, |β| large against
    |γ|, NaN and inf, absent parameters, other dtypes."""
    from normlab.core.activation import GAMMA_GUARD, RECOVERY_TOLERANCE, unrecoverable_channels

    kernels = core.kernels.cpu.build.module
    g = torch.Generator().manual_seed(0)
    C = 64
    x = torch.randn(2, C, 3, 3, generator=g)
    four_eps = 4 * torch.finfo(torch.float32).eps
    for trial in range(50):
        w = torch.randn(C, generator=g) * torch.logspace(-8, 1, C)[torch.randperm(C, generator=g)]
        b = torch.randn(C, generator=g) * torch.logspace(-3, 3, C)[torch.randperm(C, generator=g)]
        w[0], w[1], b[2] = GAMMA_GUARD, -GAMMA_GUARD * (1 - 1e-7), 1.0
        if trial % 5 == 0:
            w[3], b[4], w[5] = float("nan"), float("inf"), 0.0
        for weight, bias in ((w, b), (None, b), (w, None), (None, None), (w.double(), b.half())):
            want = unrecoverable_channels(x, weight, bias, -1, "leaky_relu", 0.01)
            got = kernels.kept_channels(weight, bias, C, four_eps, RECOVERY_TOLERANCE[torch.float32], GAMMA_GUARD)
            assert (want is None) == (got is None)
            if want is not None:
                assert torch.equal(want, got)
