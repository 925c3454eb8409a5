"""The compiled CPU kernels against the composed reference and torch.nn: every family,
layout and activation; fused norm+activation; the in-place (output-only) mode; the paths
calls take; the kernels' activation codes."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as TF
from helpers import DENSE_LAYOUTS, assert_close_scaled, in_layout
from torch import nn

import normlab as nl
from normlab import core
from normlab.core.activation import FUSED_ACTIVATIONS


def _why_the_kernels_are_not_expected() -> str | None:
    """Only two reasons excuse missing kernels; anything else is a build failure and fails
    every test here (a skip would hide it, and the composed ops would pass in their place)."""
    if core.backend() == "composed":
        return "the composed ops were asked for (NORMLAB_BACKEND=composed)"
    compiler = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension runs
    if shutil.which(compiler) is None:
        return f"no C++ compiler here ({compiler!r} is not on PATH)"
    return None


_NOT_EXPECTED = _why_the_kernels_are_not_expected()
pytestmark = pytest.mark.skipif(_NOT_EXPECTED is not None, reason=_NOT_EXPECTED or "")


@pytest.fixture(autouse=True, scope="module")
def _kernels_built():
    if not core.kernels_available():
        pytest.fail(f"a C++ compiler is here but the kernels did not build: {core.kernels.cpu.status()}")


ACTS = {
    "identity": (None, lambda z, p: z),
    "relu": (None, lambda z, p: TF.relu(z)),
    "leaky_relu": (0.1, lambda z, p: TF.leaky_relu(z, 0.1)),
    "elu": (0.7, lambda z, p: TF.elu(z, 0.7)),
    "silu": (None, lambda z, p: TF.silu(z)),
    "prelu": (0.2, lambda z, p: TF.prelu(z, p)),
}


def _grads(fn, x, params, dy):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    return (y, *torch.autograd.grad(y, [x, *params], dy))


def _close(ours, theirs, tol=2e-5):
    for a, b in zip(ours, theirs):
        assert_close_scaled(a, b, rtol=tol)


def _paths(fn, *args):
    with core.record_dispatch() as log:
        fn(*args)
    return [path for _, path, _ in log]


@pytest.mark.parametrize("layout", DENSE_LAYOUTS)
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_fused_norm_act_matches_torch_composition(norm, act, layout):
    x = in_layout(torch.randn(6, 8, 5, 3) * 2 + 1, layout)
    w = (torch.rand(8) + 0.5).requires_grad_()
    b = torch.randn(8).requires_grad_()
    param, torch_act = ACTS[act]
    prelu = torch.full((8,), 0.2).requires_grad_()
    params = [w, b] + ([prelu] if act == "prelu" else [])
    dy = torch.randn(6, 8, 5, 3)
    kwargs = dict(activation=act, activation_param=param, prelu_weight=prelu if act == "prelu" else None)
    if norm == "batch":
        ours = lambda z: nl.functional.batch_norm_act(z, None, None, w, b, True, **kwargs)  # noqa: E731
        theirs = lambda z: torch_act(TF.batch_norm(z, None, None, w, b, True), prelu)  # noqa: E731
    else:
        ours = lambda z: nl.functional.group_norm_act(z, 4, w, b, **kwargs)  # noqa: E731
        theirs = lambda z: torch_act(TF.group_norm(z, 4, w, b), prelu)  # noqa: E731
    assert _paths(ours, x.clone()) == ["kernels"]
    _close(_grads(ours, x, params, dy), _grads(theirs, x, params, dy))
    with core.use_backend("composed"):
        assert _paths(ours, x.clone()) == ["composed"]
        _close(_grads(ours, x, params, dy), _grads(theirs, x, params, dy))


@pytest.mark.parametrize("layout", DENSE_LAYOUTS)
@pytest.mark.parametrize("act,param", [("identity", None), ("leaky_relu", 0.05), ("elu", 1.0)])
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_inplace_mode_equals_the_normal_layer(norm, act, param, layout):
    torch.manual_seed(0)
    make = (
        (lambda inplace: nl.nn.BatchNormAct2d(8, activation=act, activation_param=param, inplace=inplace))
        if norm == "batch"
        else (lambda inplace: nl.nn.GroupNormAct(4, 8, activation=act, activation_param=param, inplace=inplace))
    )
    normal, inplace = make(False), make(True)
    with torch.no_grad():
        normal.weight.uniform_(-1.5, 1.5)  # negative γ too: the inversion must handle its sign
        normal.bias.normal_()
    inplace.load_state_dict(normal.state_dict())
    for backend in ("auto", "composed"):
        with core.use_backend(backend):
            x = in_layout(torch.randn(6, 8, 5, 3) * 3 - 1, layout)
            dy = torch.randn(6, 8, 5, 3)
            results = []
            for layer in (normal, inplace):
                layer.zero_grad()
                leaf = x.clone().requires_grad_()
                y = layer(leaf * 1.0)  # a non-leaf input, as after a convolution
                y.backward(dy)
                results.append((y.detach(), leaf.grad, layer.weight.grad, layer.bias.grad))
            _close(results[1], results[0], tol=1e-4)
    if norm == "batch":
        assert torch.equal(normal.running_mean, inplace.running_mean)


def test_inplace_really_overwrites_and_refuses_unsafe_use():
    layer = nl.nn.BatchNormAct2d(4, activation="leaky_relu", inplace=True)
    x = torch.randn(3, 4, 5, 5)
    before = x.clone()
    y = layer(x)
    assert y.data_ptr() == x.data_ptr() and not torch.equal(x, before)
    with pytest.raises(RuntimeError, match="leaf"):
        layer(torch.randn(3, 4, 5, 5, requires_grad=True))
    leaf = torch.randn(3, 4, 5, 5, requires_grad=True)
    h = leaf * 2
    squared = h.pow(2)  # saves h for its backward
    y = layer(h)  # then overwrites h
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (squared.sum() + y.sum()).backward()


def test_saved_tensors_for_backward():
    def saved_bytes(module, x):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
        return sum(v for v in storages.values() if v > 1024)  # activations, not γ/β

    x = torch.randn(8, 16, 14, 14, requires_grad=True)
    act_bytes = x.numel() * 4
    reference = nn.Sequential(nn.BatchNorm2d(16), nn.LeakyReLU(0.01))
    fused = nl.nn.BatchNormAct2d(16, activation="leaky_relu")
    inplace = nl.nn.BatchNormAct2d(16, activation="leaky_relu", inplace=True)
    assert saved_bytes(reference, x) == 2 * act_bytes  # BN keeps x, LeakyReLU keeps its input
    assert saved_bytes(fused, x) == act_bytes
    assert saved_bytes(inplace, x * 1) == act_bytes  # the output, which the next layer keeps anyway


def test_layer_and_rms_norm_paths_and_dispatch_log():
    x = torch.randn(10, 7, 48) * 3 + 2
    ln = nl.nn.LayerNorm(48)
    rms = nl.nn.RMSNorm(48)
    with core.record_dispatch() as log:
        ln(x)
        rms(x)
        ln(x.double().requires_grad_() if False else x[:, :, ::2].contiguous().repeat(1, 1, 2))
        nl.nn.LayerNorm(48, dtype=torch.float64)(x.double())
    # float64 runs torch's own kernels: the same definition, and float64 needs no shift trick
    assert [p for _, p, _ in log] == ["kernels", "kernels", "kernels", "native"]
    assert log[-1][2] == "not float32 CPU"


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: nl.nn.BatchNormAct2d(4, activation="elu"), (6, 4, 3, 3)),
        (lambda: nl.nn.GroupNormAct(2, 4, activation="silu"), (6, 4, 3, 3)),
        (lambda: nl.nn.BatchNorm2d(4).eval(), (6, 4, 3, 3)),
        (lambda: nl.nn.LayerNorm(5), (6, 4, 5)),
        (lambda: nl.nn.RMSNorm(5), (6, 4, 5)),
        (lambda: nl.nn.LayerNorm(1), (6, 4, 1)),  # one normalized element: the last dim still
        (lambda: nl.nn.RMSNorm(1), (6, 1)),  # is the reference's (an IndexError before)
    ],
    ids=["bn-elu", "gn-silu", "bn-eval", "ln", "rms", "ln-k1", "rms-k1"],
)
def test_second_derivatives_through_the_kernels(make, shape):
    """create_graph=True falls back to the composed reference: same second derivatives."""
    torch.manual_seed(0)
    layer = make()
    data = torch.randn(shape) * 2 + 1
    results = []
    for backend in ("auto", "composed"):
        with core.use_backend(backend):
            x = data.clone().requires_grad_()
            layer.zero_grad()
            (g,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
            g.pow(2).sum().backward()
            results.append((g.detach(), x.grad, layer.weight.grad))
    _close(results[0], results[1], tol=1e-4)


def test_the_kernels_loaded_are_this_torch_installations():
    build = core.kernels.cpu.build
    entry = build.build_root() / build.build_name(build.installation())
    assert core.kernels.cpu.status().startswith(f"kernels loaded from {entry}")


def test_backend_switch_validation():
    with pytest.raises(ValueError, match="backend must be one of"):
        core.set_backend("gpu")
    assert core.backend() == "auto"
    with core.use_backend("composed"):
        assert core.backend() == "composed"
    with core.use_backend("fast"):  # the old name of "kernels"
        assert core.backend() == "kernels"
    assert core.backend() == "auto"


def test_large_mean_accuracy_on_the_kernels():
    x = 1e4 + 0.01 * torch.randn(16, 8, 5, 5)
    y = nl.functional.batch_norm(x, None, None, training=True)
    y64 = TF.batch_norm(x.double(), None, None, training=True)
    assert (y.double() - y64).abs().max().item() < 1e-4  # torch.nn float32: 0.04
    cl = x.contiguous(memory_format=torch.channels_last)
    y = nl.functional.group_norm(cl, 2)
    assert (y.double() - TF.group_norm(x.double(), 2)).abs().max().item() < 1e-4


def test_fused_checkpoints_are_the_norms_plus_the_activation():
    bn = nn.BatchNorm2d(6)
    bn(torch.randn(4, 6, 3, 3))
    fused = nl.nn.BatchNormAct2d(6, activation="relu")
    fused.load_state_dict(bn.state_dict())
    nn.BatchNorm2d(6).load_state_dict(fused.state_dict())
    prelu = nl.nn.BatchNormAct2d(6, activation="prelu")
    assert list(prelu.state_dict()) == list(bn.state_dict()) + ["act.weight"]
    gn = nl.nn.GroupNormAct(3, 6, activation="silu")
    gn.load_state_dict(nn.GroupNorm(3, 6).state_dict())
    with pytest.raises(ValueError, match="needs an invertible one"):
        nl.nn.GroupNormAct(3, 6, activation="silu", inplace=True)
    with pytest.raises(ValueError, match="activation must be one of"):
        nl.nn.BatchNormAct2d(6, activation="gelu")


def test_eval_and_frozen_fused_layers():
    layer = nl.nn.BatchNormAct2d(5, activation="elu")
    layer(torch.randn(8, 5, 4, 4) * 2 + 1)
    layer.eval()
    x = torch.randn(3, 5, 4, 4)
    expected = TF.elu(TF.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    layer.train()
    layer.freeze()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("layout", [*DENSE_LAYOUTS, "rows"])
def test_first_value_far_from_the_mean_costs_no_accuracy(layout):
    # Each group's first value sits 6σ out. A shift taken from that value alone would make
    # Σd²/n − (Σd/n)² cancel ~37-fold on 64-value groups; the sampled shift keeps the
    # float32 result as close to float64 as for ordinary data.
    g = torch.Generator().manual_seed(0)
    if layout == "rows":
        x = torch.randn(512, 64, generator=g)
        x[:, 0] = 6.0
        ours = nl.functional.layer_norm(x, (64,))
        exact = TF.layer_norm(x.double(), (64,))
    else:
        x = torch.randn(32, 16, 8, 8, generator=g)
        x[:, :, 0, 0] = 6.0
        x = in_layout(x, layout)
        ours = nl.functional.instance_norm(x)
        exact = TF.instance_norm(x.double())
    err = ((ours.double() - exact).abs().max() / exact.abs().max()).item()
    assert err < 4e-7, err


def test_the_kernels_switch_on_the_registry_codes():
    expected = {name: entry.code for name, entry in core.ACTIVATIONS.items() if entry.fused}
    assert core.kernels.cpu.load().activation_codes == expected
    assert list(expected) == list(FUSED_ACTIVATIONS) and sorted(expected.values()) == list(range(len(expected)))


def test_kernels_with_other_activation_codes_are_refused(monkeypatch):
    build = core.kernels.cpu.build
    swapped = {**build.load().activation_codes, "relu": 2, "leaky_relu": 1}
    fake = type("FakeKernels", (), {"activation_codes": swapped})()
    monkeypatch.setattr(build, "_build", lambda: (fake, "fake.so"))
    monkeypatch.setattr(build, "module", None)
    monkeypatch.setattr(build, "_state", {"path": None, "error": None, "tried": False})
    with pytest.warns(RuntimeWarning, match="the kernels' activation codes .* differ from normlab.core.activation's"):
        assert build.load() is None
    assert "enum Act and its activation_codes table must follow the registry" in build.status()
    x = torch.randn(4, 3, 2, 2)
    with core.record_dispatch() as log:  # and the composed ops run in their place
        y = nl.functional.batch_norm_act(x, None, None, training=True, activation="relu")
    assert [path for _, path, _ in log] == ["composed"]
    torch.testing.assert_close(y, TF.relu(TF.batch_norm(x, None, None, training=True)))
