"""The norms beyond the classic five against a float64 NumPy reference of each paper's formula,
float64 gradcheck on every path, torch.nn itself where a special case is a torch.nn layer, their
running statistics, and their errors.

The cases table builds each layer with non-trivial parameters; every test is parametrized
over it, so a new layer is one row."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import numpy_reference as ref
import pytest
import torch
import torch.nn.functional as TF
from helpers import LAYOUTS, assert_close_scaled, in_layout
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import normlab as nl

core = nl.core


def _np(t):
    return None if t is None else t.detach().double().numpy()


@dataclass
class Case:
    """A layer, the NumPy formula it must equal, and an input shape."""

    build: Callable[[], nn.Module]
    reference: Callable  # (x: ndarray, params: dict of ndarrays, module) -> ndarray
    shape: tuple[int, ...]
    params: tuple[str, ...]  # the parameter names the reference takes, in order


def _frn(x, p, m):
    return ref.filter_response_norm(x, p["weight"], p["bias"], m.eps, p.get("tau"))


def _evo_b(variant):
    def f(x, p, m):
        running = None if m.training else _np(m.running_var)
        return ref.evonorm_batch(x, variant, p["weight"], p["bias"], p.get("v"), m.eps, running)

    return f


def _evo_s(numerator, stat):
    def f(x, p, m):
        return ref.evonorm_sample(
            x, m.groups, p["weight"], p["bias"], m.eps, numerator=numerator, stat=stat, v=p.get("v")
        )

    return f


def _switchable(x, p, m):
    running = None if m.training else (_np(m.running_mean), _np(m.running_var))
    return ref.switchable_norm(x, p["weight"], p["bias"], p["mean_weight"], p["var_weight"], m.eps, running)


def _conv(weight_fn):
    def f(x, p, m):
        w = weight_fn(p, m)
        out = TF.conv2d(
            torch.from_numpy(x),
            torch.from_numpy(w),
            None if p.get("bias") is None else torch.from_numpy(p["bias"]),
            m.stride,
            m.padding,
            m.dilation,
            m.groups,
        )
        return out.numpy()

    return f


CASES = {
    "StdConv2d": Case(
        lambda: nl.nn.StdConv2d(4, 6, 3, bias=True, eps=1e-5),
        _conv(lambda p, m: ref.weight_standardization(p["weight"], m.eps)),
        (2, 4, 5, 5),
        ("weight", "bias"),
    ),
    "ScaledStdConv2d": Case(
        lambda: nl.nn.ScaledStdConv2d(4, 6, 3, gamma=1.7),
        _conv(lambda p, m: ref.weight_standardization(p["weight"], m.eps, p["gain"].reshape(-1) * m.scale)),
        (2, 4, 5, 5),
        ("weight", "bias", "gain"),
    ),
    "FilterResponseNorm2d": Case(lambda: nl.nn.FilterResponseNorm2d(4), _frn, (2, 4, 3, 5), ("weight", "bias")),
    "FilterResponseNormTlu2d": Case(
        lambda: nl.nn.FilterResponseNormTlu2d(4), _frn, (2, 4, 3, 5), ("weight", "bias", "tau")
    ),
    "EvoNormB0": Case(lambda: nl.nn.EvoNormB0(4), _evo_b("b0"), (3, 4, 3, 3), ("weight", "bias", "v")),
    "EvoNormB1": Case(lambda: nl.nn.EvoNormB1(4), _evo_b("b1"), (3, 4, 3, 3), ("weight", "bias")),
    "EvoNormB2": Case(lambda: nl.nn.EvoNormB2(4), _evo_b("b2"), (3, 4, 3, 3), ("weight", "bias")),
    "EvoNormS0": Case(
        lambda: nl.nn.EvoNormS0(8, groups=2), _evo_s("gate", "std"), (2, 8, 3, 3), ("weight", "bias", "v")
    ),
    "EvoNormS0a": Case(
        lambda: nl.nn.EvoNormS0a(8, group_size=4, apply_act=False),
        _evo_s(None, "std"),
        (2, 8, 3, 3),
        ("weight", "bias"),
    ),
    "EvoNormS1": Case(lambda: nl.nn.EvoNormS1(8, groups=2), _evo_s("silu", "std"), (2, 8, 3, 3), ("weight", "bias")),
    "EvoNormS2a": Case(lambda: nl.nn.EvoNormS2a(8, groups=4), _evo_s("silu", "rms"), (2, 8, 3, 3), ("weight", "bias")),
    "SwitchableNorm2d": Case(
        lambda: nl.nn.SwitchableNorm2d(4), _switchable, (3, 4, 3, 2), ("weight", "bias", "mean_weight", "var_weight")
    ),
    "DyT": Case(
        lambda: nl.nn.DyT(5, alpha_init_value=0.8),
        lambda x, p, m: ref.dyt(x, p["alpha"], p["weight"], p["bias"]),
        (2, 3, 5),
        ("alpha", "weight", "bias"),
    ),
    "DyT-channels-first": Case(
        lambda: nl.nn.DyT(4, channels_last=False),
        lambda x, p, m: ref.dyt(x, p["alpha"], p["weight"][:, None, None], p["bias"][:, None, None]),
        (2, 4, 3, 3),
        ("alpha", "weight", "bias"),
    ),
    "Derf": Case(
        lambda: nl.nn.Derf(5, shift_init_value=0.1),
        lambda x, p, m: ref.derf(x, p["alpha"], p["shift"], p["weight"], p["bias"]),
        (2, 3, 5),
        ("alpha", "shift", "weight", "bias"),
    ),
    "ScaleNorm": Case(
        lambda: nl.nn.ScaleNorm(5), lambda x, p, m: ref.scale_norm(x, p["scale"], m.eps), (2, 3, 5), ("scale",)
    ),
}


def _built(name: str, seed: int = 0) -> nn.Module:
    """The layer with its parameters moved off their initial values (so each one matters)."""
    torch.manual_seed(seed)
    module = CASES[name].build()
    with torch.no_grad():
        for pname, p in module.named_parameters():
            if pname in ("alpha", "shift", "scale"):
                p.mul_(1.3).add_(0.05)
            else:
                p.add_(0.3 * torch.randn_like(p))
        if getattr(module, "running_var", None) is not None:
            module.running_var.uniform_(0.5, 2.0)
        if getattr(module, "running_mean", None) is not None:
            module.running_mean.uniform_(-0.5, 0.5)
    return module


def _reference(name, module, x, params):
    case = CASES[name]
    return case.reference(_np(x), {k: _np(v) for k, v in params.items()}, module)


MODES = ("train", "eval")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_gradients_match_the_numpy_formula(name, mode):
    module = _built(name)
    getattr(module, mode)()
    case = CASES[name]
    x = (torch.randn(case.shape) * 1.5 + 0.3).requires_grad_()
    params = {k: getattr(module, k) for k in case.params}
    before = {k: v.clone() for k, v in module.state_dict().items()}
    y = module(x)
    expected = _reference(name, _frozen_copy(module, before), x, params)
    assert_close_scaled(y.detach().double(), torch.from_numpy(expected), rtol=2e-6, what="output")
    dy = torch.randn_like(y)
    y.backward(dy)
    module_for_ref = _frozen_copy(module, before)
    names = ("x",) + case.params

    def f(xv, *pv):
        return _reference(name, module_for_ref, torch.from_numpy(xv), dict(zip(case.params, map(torch.from_numpy, pv))))

    numeric = ref.numeric_grad(f, [_np(x)] + [_np(p) for p in params.values()], _np(dy))
    grads = [x.grad] + [p.grad for p in params.values()]
    for n, g, e in zip(names, grads, numeric):
        assert_close_scaled(g.double(), torch.from_numpy(e).reshape(g.shape), rtol=2e-5, what=f"d{n}")


def _frozen_copy(module, state):
    """The module with its state before the call (the reference must see the running estimates
    the call used, not the ones it left)."""
    import copy

    clone = copy.deepcopy(module)
    clone.load_state_dict(state)
    return clone


@pytest.mark.parametrize("backend", ["auto", "composed"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_float64_gradcheck_on_each_path(name, mode, backend):
    """float64 runs the differentiable-ops path by default, bar the closed-form family
    (EvoNorm-B0/S0, SwitchableNorm), whose autograd Functions run on every dtype; "composed"
    forces the closed forms (the family's differentiable formula: test_closed_form_family_*)."""
    module = _built(name).double()
    getattr(module, mode)()
    # training updates running estimates on every call: gradcheck's repeated calls must all see the
    # same ones, so those layers are checked with a fresh copy per call
    state = {k: v.clone() for k, v in module.state_dict().items()}
    case = CASES[name]
    x = (torch.randn(case.shape, dtype=torch.float64) + 0.2).requires_grad_()
    params = [getattr(module, k) for k in case.params]

    def fn(x, *ps):
        m = _frozen_copy(module, state)
        return torch.func.functional_call(m, dict(zip(case.params, ps)), (x,))

    with core.use_backend(backend):
        assert torch.autograd.gradcheck(fn, (x, *params), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(
    "name, mode",
    [
        (n, "train")
        for n in ("DyT", "Derf", "FilterResponseNormTlu2d", "StdConv2d", "EvoNormS0", "EvoNormB1", "EvoNormB0")
    ]
    + [("SwitchableNorm2d", "train"), ("SwitchableNorm2d", "eval")],
)
def test_closed_forms_give_second_derivatives(name, mode):
    module = getattr(_built(name).double(), mode)()
    case = CASES[name]
    # gradgradcheck's cost grows with the input's size: the batch norms' smallest batch that
    # still has several values per statistic (2 samples × 2 positions)
    shape = (2, 4, 2, 1) if name in ("SwitchableNorm2d", "EvoNormB0") else case.shape
    x = (torch.randn(shape, dtype=torch.float64) + 0.2).requires_grad_()
    params = [getattr(module, k) for k in case.params]

    def fn(x, *ps):
        return torch.func.functional_call(module, dict(zip(case.params, ps)), (x,))

    with core.use_backend("composed"):
        assert torch.autograd.gradgradcheck(fn, (x, *params), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_paths_agree(name):
    """The kernels-or-closed-form path and the composed one give the same values and gradients."""
    results = []
    for backend in ("auto", "composed"):
        module = _built(name)
        x = (torch.randn(CASES[name].shape, generator=torch.Generator().manual_seed(1)) * 2).requires_grad_()
        with core.use_backend(backend):
            y = module(x)
            y.backward(torch.ones_like(y) + 0.1 * y.detach())
        results.append([y.detach(), x.grad] + [p.grad for p in module.parameters()])
    for a, b in zip(*results):
        assert_close_scaled(a, b, rtol=1e-5)


CLOSED_FORM_FAMILY = {
    "SwitchableNorm2d": "_SwitchableBackward",
    "EvoNormB0": "_EvoNormB0Backward",
    "EvoNormS0": "_EvoNormS0Backward",
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CLOSED_FORM_FAMILY))
def test_closed_form_family_runs_its_function_eagerly_on_every_dtype(name, dtype):
    """The path rule's row 10b: the autograd Function on any dtype in eager; a forced "native"
    (and export, torch.func, forward AD, compile: tests/toolchain) the differentiable formula,
    which gives the same values and gradients."""
    results = []
    for backend in ("auto", "native"):
        module = _built(name).to(dtype)
        x = (torch.randn(CASES[name].shape, generator=torch.Generator().manual_seed(1)) * 2).to(dtype).requires_grad_()
        with core.use_backend(backend):
            y = module(x)
        assert (type(y.grad_fn).__name__ == CLOSED_FORM_FAMILY[name]) == (backend == "auto"), type(y.grad_fn)
        y.backward(torch.ones_like(y) + 0.1 * y.detach())
        results.append([y.detach(), x.grad] + [p.grad for p in module.parameters()])
    for a, b in zip(*results):
        assert_close_scaled(a.double(), b.double(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5)


def test_closed_form_family_keeps_only_the_input_for_backward():
    """Autograd through the formula keeps 3-6 activation-sized tensors per layer; the closed
    forms keep the input (and per-group statistics)."""
    for name in sorted(CLOSED_FORM_FAMILY):
        module = _built(name)
        x = torch.randn(CASES[name].shape, requires_grad=True)
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(saved.append, lambda _: None):
            module(x)
        big = {t.untyped_storage().data_ptr() for t in saved if t.numel() >= x.numel()}
        assert big == {x.untyped_storage().data_ptr()}, (name, len(big))


# --- special cases that are torch.nn's own layers --------------------------------------------------


def test_weight_standardization_is_layer_norm_of_the_weight_rows():
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    ours = nl.functional.weight_standardization(w, 1e-5)
    theirs = TF.layer_norm(w.reshape(6, -1), (36,), eps=1e-5).reshape_as(w)
    timm_form = TF.batch_norm(w.reshape(1, 6, -1), None, None, training=True, momentum=0.0, eps=1e-5).reshape_as(w)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours, timm_form)


def test_frn_without_affine_is_rms_norm_over_the_spatial_dims():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(nl.functional.filter_response_norm(x, eps=1e-5), TF.rms_norm(x, (4, 5), eps=1e-5))


@pytest.mark.parametrize("which, torch_layer", [(0, "instance"), (1, "layer"), (2, "batch")])
def test_switchable_norm_with_one_hot_logits_is_that_norm(which, torch_layer):
    """Softmax of logits (0, 0, 60) with 60 at IN, LN or BN is that norm's statistics to 1e-26:
    outputs, gradients and (BN) running statistics against torch.nn in train and eval."""
    torch.manual_seed(0)
    ours = nl.nn.SwitchableNorm2d(4, momentum=0.3)
    with torch.no_grad():
        for logits in (ours.mean_weight, ours.var_weight):
            logits.zero_()[which] = 60.0
    theirs = {
        "instance": nn.InstanceNorm2d(4, affine=True),
        "layer": nn.GroupNorm(1, 4),
        "batch": nn.BatchNorm2d(4, momentum=0.3),
    }[torch_layer]
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
        ours.weight.copy_(theirs.weight)
        ours.bias.copy_(theirs.bias)
    for step in range(3):
        x = torch.randn(3, 4, 5, 5) * 2 + step
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [ours(xs[0]), theirs(xs[1])]
        torch.testing.assert_close(ys[0], ys[1], rtol=1e-5, atol=1e-5)
        for y in ys:
            (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)
    if torch_layer == "batch":
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
        assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3
        ours.eval()
        theirs.eval()
        x = torch.randn(2, 4, 5, 5)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_switchable_norm_without_bn_depends_on_no_batch():
    layer = nl.nn.SwitchableNorm2d(4, using_bn=False)
    assert layer.running_mean is None and layer.mean_weight.shape == (2,)
    x = torch.randn(3, 4, 3, 3)
    torch.testing.assert_close(layer(x)[1:2], layer(x[1:2]))


def test_switchable_norm_stays_accurate_on_large_mean_data():
    """E[x²] − E[x]² (the authors' LN and BN variance) gives 16 for a variance of 1e-4 at 1e4 ± 0.01
    in float32, and means rounded to float32 shift every output by 5% of a standard deviation."""
    torch.manual_seed(0)
    x = 1e4 + 0.01 * torch.randn(4, 3, 6, 6)
    layer = nl.nn.SwitchableNorm2d(3)
    expected = ref.switchable_norm(_np(x), None, None, np.ones(3), np.ones(3), 1e-5)
    assert (layer(x).double() - torch.from_numpy(expected)).abs().max().item() < 1e-5


def test_switchable_norm_stays_accurate_on_huge_values():
    """At 1e19 the squares of the raw spread (1e38) are at float32's edge; the moments taken as
    Welford reductions of the shifted input keep the output within float32 rounding of the
    float64 formula (merging the instance moments was off by 3), and every gradient finite
    (it gave a NaN for the variance logits)."""
    torch.manual_seed(0)
    x = 1e19 * torch.randn(4, 3, 5, 4)
    layer = nl.nn.SwitchableNorm2d(3)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.3, -0.2, 0.1]))
        layer.var_weight.copy_(torch.tensor([-0.1, 0.4, 0.2]))
    expected = ref.switchable_norm(_np(x), None, None, _np(layer.mean_weight), _np(layer.var_weight), 1e-5)
    inp = x.clone().requires_grad_()
    y = layer(inp)
    assert (y.double() - torch.from_numpy(expected)).abs().max().item() < 1e-5
    (y * torch.randn_like(y)).sum().backward()
    for grad in (inp.grad, layer.weight.grad, layer.bias.grad, layer.mean_weight.grad, layer.var_weight.grad):
        assert torch.isfinite(grad).all()
    assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_var).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scale", [1e14, 1e16])
def test_switchable_norm_gradients_stay_accurate_at_large_spread(scale, mode):
    """Finite is not enough: at σ = 1e16 the float32 gradients must still match float64's (the
    composed ops in float64). Autograd through rsqrt(σ² + ε) forms σ⁻³, which underflows float32
    above σ ≈ 1e12.6: there the input's gradient was 34 % off at 1e16 (1e-4 at 1e14) and the
    variance logits' gradient 0; the closed form never forms it."""
    torch.manual_seed(0)
    x = scale * torch.randn(2, 4, 3, 3, dtype=torch.float64)
    g = torch.randn_like(x)
    grads = {}
    for dtype, backend in ((torch.float64, "native"), (torch.float32, "auto")):
        layer = nl.nn.SwitchableNorm2d(4).to(dtype)
        layer.running_var.fill_(scale**2)
        getattr(layer, mode)()
        inp = x.to(dtype, copy=True).requires_grad_()
        with core.use_backend(backend):
            (layer(inp) * g.to(dtype)).sum().backward()
        grads[dtype] = [inp.grad.double() * scale, layer.var_weight.grad.double(), layer.mean_weight.grad.double()]
    for got, want in zip(grads[torch.float32], grads[torch.float64]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


# --- running statistics ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["EvoNormB0", "SwitchableNorm2d"])
def test_running_variance_is_unbiased_with_torch_momentum(name):
    layer = {
        "EvoNormB0": lambda: nl.nn.EvoNormB0(3, momentum=0.25),
        "SwitchableNorm2d": lambda: nl.nn.SwitchableNorm2d(3, momentum=0.25),
    }[name]()
    start = layer.running_var.clone()
    x = torch.randn(4, 3, 5, 5) * 3
    layer(x)
    n = 4 * 25
    batch_var = x.double().var(dim=(0, 2, 3), unbiased=False)
    expected = 0.75 * start.double() + 0.25 * batch_var * n / (n - 1)
    torch.testing.assert_close(layer.running_var.double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["EvoNormB0", "SwitchableNorm2d"])
def test_a_nonfinite_batch_never_reaches_the_running_statistics(name):
    layer = {"EvoNormB0": nl.nn.EvoNormB0, "SwitchableNorm2d": nl.nn.SwitchableNorm2d}[name](3)
    layer(torch.randn(2, 3, 4, 4))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 3, 4, 4)
    x[0, 1, 2, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite"):
        layer(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k
    strict = {"EvoNormB0": nl.nn.EvoNormB0, "SwitchableNorm2d": nl.nn.SwitchableNorm2d}[name](3, on_nonfinite="raise")
    with pytest.raises(core.NonFiniteStatisticsError):
        strict(x)


def test_switchable_momentum_none_is_the_cumulative_average():
    layer = nl.nn.SwitchableNorm2d(2, momentum=None)
    batches = [torch.randn(3, 2, 4, 4) + i for i in range(4)]
    for x in batches:
        layer(x)
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in batches])
    torch.testing.assert_close(layer.running_mean, means.mean(0), rtol=1e-5, atol=1e-6)
    assert layer.num_batches_tracked.item() == 4


@pytest.mark.parametrize("name", ["EvoNormB0", "SwitchableNorm2d"])
def test_frozen_layers_use_and_keep_their_running_statistics_in_training(name):
    layer = _built(name)
    reference = _frozen_copy(layer, layer.state_dict()).eval()
    layer.freeze()
    layer.train()
    x = torch.randn(3, 4, 3, 3) if name == "EvoNormB0" else torch.randn(3, 4, 3, 2)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    torch.testing.assert_close(layer(x), reference(x))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not any(p.requires_grad for p in layer.parameters())


# --- property tests: shapes, layouts and dtypes vary ------------------------------------------------

_SHAPED = {
    "frn": (lambda c: nl.nn.FilterResponseNormTlu2d(c), lambda x, m: _frn(x, _params(m), m)),
    "evonorm_b0": (lambda c: nl.nn.EvoNormB0(c), lambda x, m: _evo_b("b0")(x, _params(m), m)),
    "evonorm_s0": (lambda c: nl.nn.EvoNormS0(c, groups=c // 2), lambda x, m: _evo_s("gate", "std")(x, _params(m), m)),
    "switchable": (lambda c: nl.nn.SwitchableNorm2d(c), lambda x, m: _switchable(x, _params(m), m)),
    "dyt": (
        lambda c: nl.nn.DyT(c, channels_last=False),
        lambda x, m: ref.dyt(x, _np(m.alpha), _np(m.weight)[:, None, None], _np(m.bias)[:, None, None]),
    ),
    "derf": (
        lambda c: nl.nn.Derf(c, channels_last=False),
        lambda x, m: ref.derf(x, _np(m.alpha), _np(m.shift), _np(m.weight)[:, None, None], _np(m.bias)[:, None, None]),
    ),
}


def _params(m):
    return {k: _np(v) for k, v in m.named_parameters()}


@given(
    kind=st.sampled_from(sorted(_SHAPED)),
    n=st.integers(2, 4),
    c=st.sampled_from([2, 4, 6]),
    h=st.integers(1, 5),
    w=st.integers(2, 5),
    layout=st.sampled_from(LAYOUTS),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_property_any_shape_layout_and_dtype_matches_float64(kind, n, c, h, w, layout, dtype, scale):
    build, formula = _SHAPED[kind]
    torch.manual_seed(n * 100 + c * 10 + h)
    module = build(c)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = (torch.randn(n, c, h, w, dtype=torch.float64) * scale + 0.1 * scale).to(dtype)
    expected = torch.from_numpy(formula(_np(x), module))
    module = module.to(torch.float64 if dtype == torch.float64 else torch.float32)
    y = module(in_layout(x, layout))
    assert y.dtype == dtype and y.shape == x.shape
    if layout == "channels_last":  # the layout is kept, as normlab's classic layers keep it
        assert y.is_contiguous(memory_format=torch.channels_last)
    rtol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2}[dtype]
    assert_close_scaled(y.double(), expected, rtol=rtol, what=f"{kind} {layout} {dtype}")


# --- errors a user can act on ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, x, error, match",
    [
        (lambda: nl.nn.FilterResponseNormTlu2d(4), torch.randn(2, 3, 4, 4), ValueError, "expects 4 channels"),
        (lambda: nl.nn.FilterResponseNorm2d(4), torch.randn(2, 4, 4), ValueError, r"\(N, C, H, W\)"),
        (lambda: nl.nn.EvoNormB0(4), torch.randn(2, 4, 3, 3, dtype=torch.float64), TypeError, "dtype"),
        (lambda: nl.nn.EvoNormS0(4, groups=2), torch.randn(2, 4, 3, 3).long(), TypeError, "floating"),
        (lambda: nl.nn.SwitchableNorm2d(4), torch.randn(1, 4, 1, 1), ValueError, "more than 1 value"),
        (lambda: nl.nn.EvoNormB0(4), torch.randn(1, 4, 1, 1), ValueError, "more than 1 value"),
        (lambda: nl.nn.DyT(8), torch.randn(2, 3, 5), ValueError, "trailing dims"),
        (lambda: nl.nn.DyT(8, channels_last=False), torch.randn(2, 5, 3), ValueError, "dim 1"),
        (lambda: nl.nn.ScaleNorm(5), torch.randn(2, 4), ValueError, "trailing dims"),
        (lambda: nl.nn.QKNorm(8), torch.randn(2, 4, 5), ValueError, r"\(\*, 8\)"),
    ],
)
def test_bad_inputs_raise_clear_errors(make, x, error, match):
    layer = make()
    with pytest.raises(error, match=match):
        layer(x, x) if isinstance(layer, nl.nn.QKNorm) else layer(x)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: nl.nn.EvoNormS0(12, groups=5), ValueError, "must divide"),
        (lambda: nl.nn.EvoNormS0a(12, group_size=5), ValueError, "must divide"),
        (lambda: nl.nn.EvoNormB0(4, momentum=None), ValueError, "momentum=None"),
        (lambda: nl.nn.EvoNormB0(4, momentum=1.5), ValueError, "momentum"),
        (lambda: nl.nn.FilterResponseNormTlu2d(4, rms=False), ValueError, "root mean square"),
        (lambda: nl.nn.FilterResponseNorm2d(4, eps=-1.0), ValueError, "eps"),
        (lambda: nl.nn.DyT((4, 4), channels_last=False), ValueError, "channel count"),
        (lambda: nl.nn.DyT(4, alpha_init_value="0.5"), TypeError, "alpha_init_value"),
        (lambda: nl.nn.DyT(4, alpha_init_value=True), TypeError, "alpha_init_value must be a float, got True"),
        (lambda: nl.nn.Derf(4, shift_init_value=None), TypeError, "shift_init_value must be a float, got None"),
        (lambda: nl.nn.ScaleNorm(4, scale_init="2"), TypeError, "scale_init must be a float or None, got '2'"),
        (lambda: nl.nn.QKNorm(8, kind="l2", scale_init=False), TypeError, "scale_init must be a float, got False"),
        (lambda: nl.nn.QKNorm(8, kind="batch"), ValueError, "kind"),
        (lambda: nl.nn.StdConv2d(4, 4, 3, padding="full"), ValueError, "padding"),
        (lambda: nl.nn.SwitchableNorm2d(0), ValueError, "positive"),
    ],
)
def test_bad_constructor_arguments_raise_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_real_valued_constructor_arguments_accept_any_real_number():
    """An int or a NumPy float is a real number, kept as a Python float."""
    import numpy as np

    values = (
        nl.nn.DyT(4, alpha_init_value=np.float32(0.25)).alpha_init_value,
        nl.nn.Derf(4, shift_init_value=1).shift_init_value,
        nl.nn.ScaleNorm(4, scale_init=np.float64(3.0)).scale_init,
        nl.nn.QKNorm(8, kind="l2", scale_init=7).scale_init,
    )
    assert values == (0.25, 1.0, 3.0, 7.0)
    assert all(type(v) is float for v in values)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: nl.functional.dyt(torch.randn(2, 5), torch.ones(2)), "one value"),
        (lambda: nl.functional.dyt(torch.randn(2, 5), 0.5, torch.ones(4)), "trailing dims"),
        (lambda: nl.functional.weight_standardization(torch.randn(5)), "C_out"),
        (lambda: nl.functional.weight_standardization(torch.randn(4, 2, 3), gain=torch.ones(3)), "gain"),
        (lambda: nl.functional.filter_response_norm(torch.randn(2, 3)), "spatial"),
        (lambda: nl.functional.tlu(torch.randn(2, 3, 4), torch.zeros(4)), r"\(C,\)"),
        (
            lambda: nl.functional.switchable_norm(
                torch.randn(2, 3, 4, 4), None, None, None, None, torch.ones(4), torch.ones(4)
            ),
            "3 logits",
        ),
        (lambda: nl.functional.evonorm_s0(torch.randn(2, 6, 3, 3), 4, None, None, torch.ones(6)), "groups=4"),
    ],
)
def test_bad_functional_arguments_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- the learned-scalar layers ----------------------------------------------------------------------


def test_dyt_and_derf_defaults_and_state_dict_keys_are_the_authors():
    dyt, derf = nl.nn.DyT(6), nl.nn.Derf(6)
    assert set(dyt.state_dict()) == {"alpha", "weight", "bias"}
    assert set(derf.state_dict()) == {"alpha", "shift", "weight", "bias"}
    assert dyt.alpha.shape == (1,) and dyt.alpha.item() == 0.5 and derf.shift.item() == 0.0
    x = torch.randn(3, 6)
    torch.testing.assert_close(dyt(x), torch.tanh(0.5 * x))
    torch.testing.assert_close(derf(x), torch.erf(0.5 * x))


def test_scale_norm_initial_output_has_unit_rms():
    x = torch.randn(4, 7, 64) * 5
    y = nl.nn.ScaleNorm(64)(x)
    torch.testing.assert_close(y.square().mean(-1), torch.ones(4, 7), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["rms", "layer", "l2"])
def test_qk_norm_normalizes_each_head_of_q_and_k(kind):
    torch.manual_seed(0)
    qk = nl.nn.QKNorm(16, kind)
    q, k = torch.randn(2, 4, 10, 16) * 30, torch.randn(2, 4, 10, 16) * 0.01
    qn, kn = qk(q, k)
    if kind == "rms":
        torch.testing.assert_close(qn, TF.rms_norm(q, (16,)))
        torch.testing.assert_close(kn, TF.rms_norm(k, (16,)))
    elif kind == "layer":
        torch.testing.assert_close(qn, TF.layer_norm(q, (16,)))
        torch.testing.assert_close(kn, TF.layer_norm(k, (16,)), rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(qn.norm(dim=-1), torch.full((2, 4, 10), 10.0))
        torch.testing.assert_close(kn.norm(dim=-1), torch.ones(2, 4, 10))
        logits = qn @ kn.transpose(-1, -2)
        assert logits.abs().max().item() <= 10.0 + 1e-4
        out = TF.scaled_dot_product_attention(qn, kn, torch.randn(2, 4, 10, 16), scale=qk.softmax_scale)
        assert torch.isfinite(out).all()


def test_qk_norm_layer_loads_timm_attention_q_and_k_norms():
    attention_state = {
        "q_norm.weight": torch.rand(8),
        "q_norm.bias": torch.randn(8),
        "k_norm.weight": torch.rand(8),
        "k_norm.bias": torch.randn(8),
    }
    qk = nl.nn.QKNorm(8, "layer")
    qk.load_state_dict(attention_state)
    assert math.isclose(qk.q_norm.weight[0].item(), attention_state["q_norm.weight"][0].item())


@pytest.mark.parametrize("fill", [0.0, 1e15, -1e15, 3e38])
@pytest.mark.parametrize("name", sorted(CASES))
def test_constant_zero_and_huge_inputs_give_finite_outputs_and_gradients(name, fill):
    """A constant input has zero variance (and a zero input a zero norm): eps or the clamp keeps
    every output and gradient finite in float32 — up to 3e38 for the layers that take no
    statistics, up to 1e15 for the others (see docs/beyond.md for why not beyond)."""
    if fill == 3e38 and not name.startswith(("DyT", "Derf")):
        pytest.skip("x² overflows float32")
    module = _built(name)
    x = torch.full(CASES[name].shape, fill).requires_grad_()
    y = module(x)
    assert torch.isfinite(y).all(), name
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in module.parameters())


def test_scale_norm_and_l2_qk_norm_of_a_zero_row_have_finite_gradients():
    x = torch.zeros(2, 5, requires_grad=True)
    layer = nl.nn.ScaleNorm(5)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((2, 5), layer.scale.item() / 1e-5))  # y = g·x/ε below ε
    q = torch.zeros(3, 4, requires_grad=True)
    qn, _ = nl.nn.QKNorm(4, "l2")(q, torch.randn(3, 4))
    qn.sum().backward()
    assert torch.isfinite(q.grad).all()
