"""The Triton kernels reached through the path rule (backend "triton"): normlab's layers under
``use_backend("triton")`` against torch.nn and a float64 reference — outputs, every gradient,
running statistics, train and eval — the seam between the family entries and the kernels
(the running update done once, the policy's conventions, the in-place checks before the
kernel writes), the rule's refusals and errors, launches per call, and torch.compile.

Without a GPU this runs on CPU tensors under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), which is slow: shapes are tiny, and each test runs few calls.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from numpy_reference import masked_backward as np_masked_backward
from numpy_reference import masked_forward as np_masked_forward

import normlab as nl
from normlab import core
from normlab.core import paths
from normlab.core.kernels import triton as tk
from normlab.core.running import NonFiniteStatisticsError, RunningStats

pytestmark = pytest.mark.skipif(not tk.available(), reason=tk.status())

DEVICE = "cpu" if tk.interpreted() else "cuda"


@pytest.fixture(autouse=True)
def _triton():
    with core.use_backend("triton"):
        yield


def _step(module, x, dy, *extra):
    """One call with gradients: (output, input grad, {param name: grad}), every decision logged."""
    x = x.detach().clone().requires_grad_()
    with core.record_dispatch() as log:
        y = module(x, *extra)
    out = y[0] if isinstance(y, tuple) else y
    out.backward(dy)
    grads = {name: p.grad.detach().clone() for name, p in module.named_parameters()}
    module.zero_grad()
    return out.detach(), x.grad, grads, log


def _reference(m, x, dy, act, dtype):
    xr = x.detach().to(dtype).requires_grad_()
    yr = m(xr)
    yr = act(yr) if act is not None else yr
    yr.backward(dy.to(dtype))
    g = {name: p.grad.detach().clone() for name, p in m.named_parameters()}
    m.zero_grad()
    return yr.detach(), xr.grad, g


def _compare(nl_module, torch_module, shape, *, act=None, layout=None, steps=2, atol=2e-5):
    """Train ``steps`` calls then one eval call, normlab (backend triton, float32) against torch.nn
    in float32 (the running statistics, tight) and in float64 (outputs and gradients)."""
    t32 = torch_module.to(DEVICE)
    t64 = copy.deepcopy(torch_module).double()
    nl_module = nl_module.to(DEVICE)
    for mode in ["train"] * steps + ["eval"]:
        for m in (nl_module, t32, t64):
            m.train(mode == "train")
        x = torch.randn(shape, device=DEVICE) * 3 + 1
        if layout is not None:
            x = x.contiguous(memory_format=layout)
        dy = torch.randn(shape, device=DEVICE)
        y, dx, grads, log = _step(nl_module, x, dy)
        assert log and all(path == "triton" for _, path, _ in log), log

        y64, dx64, g64 = _reference(t64, x, dy, act, torch.float64)
        _reference(t32, x, dy, act, torch.float32)
        torch.testing.assert_close(y.double(), y64, atol=atol, rtol=atol)
        torch.testing.assert_close(dx.double(), dx64, atol=atol, rtol=atol)
        for name, g in g64.items():
            torch.testing.assert_close(grads[name].double(), g, atol=atol * 10, rtol=atol, msg=name)
        buffers = dict(nl_module.named_buffers())
        for name, buffer in t32.named_buffers():
            if name != "num_batches_tracked":  # torch.nn's InstanceNorm never counts (conventions.md)
                torch.testing.assert_close(buffers[name], buffer, atol=1e-6, rtol=1e-6, msg=name)
    if "num_batches_tracked" in buffers:
        assert int(buffers["num_batches_tracked"]) == steps
    return nl_module


@pytest.mark.parametrize(
    "make, shape, layout",
    [
        (lambda m: m.BatchNorm1d(5), (4, 5, 3), None),
        (lambda m: m.BatchNorm2d(5, momentum=None), (3, 5, 4, 3), torch.channels_last),
        (lambda m: m.BatchNorm3d(3, momentum=0.3), (2, 3, 2, 3, 2), None),
        (lambda m: m.InstanceNorm2d(4, affine=True, track_running_stats=True), (3, 4, 3, 3), None),
        (lambda m: m.GroupNorm(2, 6), (3, 6, 5), None),
        (lambda m: m.LayerNorm((4, 6)), (3, 4, 6), None),
        (lambda m: m.RMSNorm(6), (3, 4, 6), None),
    ],
    ids=[
        "batchnorm1d",
        "batchnorm2d-momentum-none-channels-last",
        "batchnorm3d",
        "instancenorm2d-tracked",
        "groupnorm",
        "layernorm",
        "rmsnorm",
    ],
)
def test_layers_match_torch_nn_and_float64(make, shape, layout):
    torch_module = make(torch.nn)
    nl_module = make(nl.nn)
    nl_module.load_state_dict(_randomized(torch_module).state_dict())
    _compare(nl_module, torch_module, shape, layout=layout)


def _randomized(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    return module


@pytest.mark.parametrize(
    "nl_module, torch_modules, shape",
    [
        (
            lambda: nl.nn.BatchNormAct2d(5, activation="leaky_relu", activation_param=0.2),
            lambda: (torch.nn.BatchNorm2d(5), torch.nn.LeakyReLU(0.2)),
            (3, 5, 3, 4),
        ),
        (
            lambda: nl.nn.GroupNormAct(2, 6, activation="silu"),
            lambda: (torch.nn.GroupNorm(2, 6), torch.nn.SiLU()),
            (2, 6, 5),
        ),
    ],
    ids=["batchnormact2d-leaky-relu", "groupnormact-silu"],
)
def test_fused_activation_layers_match_norm_then_activation(nl_module, torch_modules, shape):
    norm, act = torch_modules()
    m = nl_module()
    m.load_state_dict(_randomized(norm).state_dict())
    _compare(m, norm, shape, act=act)


def test_prelu_slopes_reach_the_kernel_as_a_parameter():
    m = nl.nn.BatchNormAct2d(4, activation="prelu").to(DEVICE)
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.1, 0.9)
    composed = copy.deepcopy(m)
    x, dy = torch.randn(2, 4, 3, 3, device=DEVICE), torch.randn(2, 4, 3, 3, device=DEVICE)
    y, dx, grads, log = _step(m, x, dy)
    assert [path for _, path, _ in log] == ["triton"]
    with core.use_backend("composed"):
        y_c, dx_c, grads_c, _ = _step(composed, x, dy)
    torch.testing.assert_close(y, y_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_c, atol=1e-5, rtol=1e-5)
    assert len(grads) == 3
    for name, g in grads_c.items():
        torch.testing.assert_close(grads[name], g, atol=1e-4, rtol=1e-5, msg=name)


def test_add_rms_norm_matches_the_sum_then_torch_rms_norm():
    m = nl.nn.AddRMSNorm(6).to(DEVICE)
    ref = torch.nn.RMSNorm(6).double()
    with torch.no_grad():
        m.weight.copy_(torch.rand(6) + 0.5)
        ref.weight.copy_(m.weight)
    x, r = (torch.randn(3, 4, 6, device=DEVICE, requires_grad=True) for _ in range(2))
    dy, ds = torch.randn(3, 4, 6, device=DEVICE), torch.randn(3, 4, 6, device=DEVICE)
    with core.record_dispatch() as log:
        y, s = m(x, r)
    assert [path for _, path, _ in log] == ["triton"]
    torch.autograd.backward((y, s), (dy, ds))
    x64, r64 = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    s64 = x64 + r64
    y64 = ref(s64)
    torch.autograd.backward((y64, s64), (dy.double(), ds.double()))
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.double(), s64, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.grad.double(), r64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.weight.grad.double(), ref.weight.grad, atol=1e-4, rtol=1e-5)


# --- masks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["batchnorm1d", "groupnorm", "instancenorm1d-tracked"])
def test_masked_layers_match_the_float64_reference_and_the_composed_path(kind):
    n, c, length = 3, 4, 7
    make = {
        "batchnorm1d": lambda: nl.nn.BatchNorm1d(c),
        "groupnorm": lambda: nl.nn.GroupNorm(2, c),
        "instancenorm1d-tracked": lambda: nl.nn.InstanceNorm1d(c, affine=True, track_running_stats=True),
    }[kind]
    m = make().to(DEVICE)
    with torch.no_grad():
        m.weight.copy_(torch.rand(c) + 0.5)
        m.bias.copy_(torch.randn(c))
    composed = copy.deepcopy(m)
    x = torch.randn(n, c, length, device=DEVICE) * 2 + 3
    mask = torch.rand(n, length, device=DEVICE) > 0.4
    mask[:, :2] = True  # every sample has at least 2 valid positions
    dy = torch.randn(n, c, length, device=DEVICE)
    y, dx, grads, log = _step(m, x, dy, mask)
    assert [path for _, path, _ in log] == ["triton"]
    with core.use_backend("composed"):
        y_c, dx_c, grads_c, log_c = _step(composed, x, dy, mask)
    assert [path for _, path, _ in log_c] == ["composed"]

    # the float64 formula: statistics over the valid positions, 0 at the others
    xn, mn = x.double().cpu().numpy(), mask.cpu().numpy()[:, None, :]
    gamma = m.weight.detach().double().cpu().numpy()
    beta = m.bias.detach().double().cpu().numpy()
    if kind == "batchnorm1d":
        shaped, m_shaped, axes, p = xn, mn, (0, 2), (1, c, 1)
    else:
        groups = 2 if kind == "groupnorm" else c
        shaped, m_shaped, axes = xn.reshape(n, groups, -1, length), mn[:, :, None, :], (2, 3)
        p = (1, groups, c // groups, 1)
    z, cache = np_masked_forward(shaped, m_shaped, None, None, axes, 1e-5)
    y_ref = (z.reshape(n, c, length) * gamma.reshape(1, c, 1) + beta.reshape(1, c, 1)) * mn
    dz = (dy.double().cpu().numpy() * gamma.reshape(1, c, 1)).reshape(shaped.shape)
    dx_ref = np_masked_backward(dz, cache)[0].reshape(n, c, length)
    dgamma_ref = (dy.double().cpu().numpy() * z.reshape(n, c, length) * mn).sum(axis=(0, 2))
    assert p  # the grouping the reference used
    np.testing.assert_allclose(y.double().cpu().numpy(), y_ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(dx.double().cpu().numpy(), dx_ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(grads["weight"].double().cpu().numpy(), dgamma_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(y, y_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_c, atol=1e-5, rtol=1e-5)
    for name, buffer in composed.named_buffers():  # the running estimates as the composed path merges them
        torch.testing.assert_close(dict(m.named_buffers())[name], buffer, atol=1e-6, rtol=1e-6, msg=name)
    if kind != "groupnorm":
        assert int(m.num_batches_tracked) == 1


# --- the seam: the running update once, with the policy's conventions -----------------------------


def _count_updates(monkeypatch):
    calls = [0]
    original = RunningStats.update

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RunningStats, "update", counted)
    return calls


def test_batchnorm_running_estimates_are_updated_in_the_kernel_only(monkeypatch):
    calls = _count_updates(monkeypatch)
    m = nl.nn.BatchNorm2d(3, momentum=None, unbiased_running_var=False).to(DEVICE)
    ref = copy.deepcopy(m)
    xs = [torch.randn(2, 3, 2, 2, device=DEVICE) * (i + 1) + i for i in range(3)]
    for x in xs:
        m(x)
    assert calls[0] == 0  # the kernel merged every batch; the entry did not merge it again
    with core.use_backend("composed"):
        for x in xs:
            ref(x)
    assert int(m.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    torch.testing.assert_close(m.running_mean, ref.running_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m.running_var, ref.running_var, atol=1e-6, rtol=1e-6)  # cumulative, biased


def test_instance_norm_running_estimates_are_merged_once_by_the_policy(monkeypatch):
    calls = _count_updates(monkeypatch)
    m = nl.nn.InstanceNorm2d(3, track_running_stats=True).to(DEVICE)
    m(torch.randn(2, 3, 3, 2, device=DEVICE))
    assert calls[0] == 1 and int(m.num_batches_tracked) == 1


def test_a_batch_that_is_not_finite_is_skipped_or_raises():
    m = nl.nn.BatchNorm1d(3).to(DEVICE)
    x = torch.randn(4, 3, device=DEVICE)
    m(x)
    before = {name: b.clone() for name, b in m.named_buffers()}
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite"):
        m(bad)
    for name, b in m.named_buffers():
        torch.testing.assert_close(b, before[name], equal_nan=False, msg=name)
    strict = nl.nn.BatchNorm1d(3, on_nonfinite="raise").to(DEVICE)
    with pytest.raises(NonFiniteStatisticsError):
        strict(bad)
    assert int(strict.num_batches_tracked) == 0 and torch.equal(strict.running_var, torch.ones(3, device=DEVICE))


# --- in place ---------------------------------------------------------------------------------------


def test_in_place_matches_the_layer_and_overwrites_its_input():
    m = nl.nn.BatchNormAct2d(4, activation="leaky_relu", inplace=True).to(DEVICE)
    plain = copy.deepcopy(m)
    plain.inplace = False
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    dy = torch.randn_like(x)
    base = torch.randn_like(x, requires_grad=True)
    inp = base * 1.0  # a non-leaf, so autograd lets the layer overwrite it
    with torch.no_grad():
        inp.copy_(x)
    with core.record_dispatch() as log:
        y = m(inp)
    assert [path for _, path, _ in log] == ["triton"]
    assert y.data_ptr() == inp.data_ptr()
    y.backward(dy)
    y_ref, dx_ref, grads_ref, _ = _step(plain, x, dy)
    torch.testing.assert_close(y.detach(), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base.grad, dx_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.weight.grad, grads_ref["weight"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.running_var, plain.running_var, atol=1e-6, rtol=1e-6)
    assert int(m.num_batches_tracked) == 1


def test_in_place_refusals_happen_before_the_kernel_writes():
    m = nl.nn.BatchNormAct2d(4, activation="leaky_relu", inplace=True).to(DEVICE)
    leaf = torch.randn(2, 4, 3, 3, device=DEVICE, requires_grad=True)
    views = (leaf * 1.0).unbind(0)
    view = views[0].unsqueeze(0)  # one of several views of one op: autograd forbids writing it
    before = views[0].detach().clone()
    with pytest.raises(RuntimeError, match="several views"):
        m(view)
    torch.testing.assert_close(views[0].detach(), before)  # nothing was written
    # spatial dims whose strides collapse: the kernels write through the strided view
    x = torch.randn(2, 4, 3, 6, device=DEVICE)[..., ::2]
    expected = m.__class__(4, activation="leaky_relu").to(DEVICE)(x)
    with core.record_dispatch() as log:
        y = m(x)
    assert log[0][1] == "triton" and y.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
    # a layout they cannot write through: the rule sends it to the composed ops, which overwrite
    # any strides — not to a contiguous copy that would leave the input untouched
    x = torch.randn(2, 4, 3, 3, device=DEVICE)[..., :2]
    expected = m.__class__(4, activation="leaky_relu").to(DEVICE)(x)
    with core.record_dispatch() as log:
        y = m(x)
    assert log[0][1] == "composed" and "do not read" in log[0][2]
    assert y.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)


# --- the rule: what the Triton kernels refuse, and forcing them where they cannot run -------------


def test_what_the_kernels_do_not_take_falls_to_native_with_the_reason():
    with core.record_dispatch() as log:
        nl.nn.BatchNorm1d(3).double().to(DEVICE)(torch.randn(4, 3, dtype=torch.float64, device=DEVICE))
        nl.nn.RMSNorm(4).to(DEVICE)(torch.randn(2, 4, 3, device=DEVICE).transpose(1, 2))
    assert log[0][1] == "native" and "backend 'triton' cannot take the call: dtype torch.float64" in log[0][2]
    assert log[1][1] == "native" and "RMSNorm on a non-contiguous input" in log[1][2]
    # the norms beyond the families ask the rule without a call (EvoNorm, FRN, ...): torch's ops
    assert core.choose_path(torch.randn(2, 3, device=DEVICE)).path == "native"
    with core.record_dispatch() as log:
        nl.nn.FilterResponseNorm2d(3).to(DEVICE)(torch.randn(2, 3, 2, 2, device=DEVICE))
    assert all(path != "triton" for _, path, _ in log)


def test_under_autocast_the_norms_torch_computes_in_float32_go_to_torch():
    x = torch.randn(2, 4, 3, device=DEVICE).bfloat16()
    with torch.autocast(DEVICE, dtype=torch.bfloat16), core.record_dispatch() as log:
        y_bn = nl.nn.BatchNorm1d(4).to(DEVICE)(x)
        y_ln = nl.nn.LayerNorm(3).to(DEVICE)(x)
        y_gn = nl.nn.GroupNorm(2, 4).to(DEVICE)(x)
        expected = torch.nn.LayerNorm(3).to(DEVICE)(x).dtype, torch.nn.GroupNorm(2, 4).to(DEVICE)(x).dtype
    assert [path for _, path, _ in log] == ["triton", "native", "native"]
    assert all("autocast" in reason for _, _, reason in log[1:])
    assert y_bn.dtype == torch.bfloat16 and (y_ln.dtype, y_gn.dtype) == expected


def test_auto_sends_cuda_tensors_to_the_gpu_kernels_the_reason_recorded_where_they_refuse(monkeypatch):
    """The rule's CUDA row, asked with fake CUDA tensors (no GPU needed) and a stand-in backend."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    class Picky:
        def unavailable(self, x):
            return ""

        def takes(self, x, family, call, **kwargs):
            return (x.dtype != torch.float64, "dtype torch.float64")

    monkeypatch.setattr(paths, "_PLAIN", (*paths._PLAIN, FakeTensor))  # the fakes stand for plain tensors
    paths.register_gpu_kernels(Picky())
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), core.use_backend("auto"):
            x = torch.empty(2, 3, 4, device="cuda")
            mask = torch.ones(2, 4, dtype=torch.bool, device="cuda")
            assert core.choose_path(x) == ("triton", "eager", "")
            assert core.choose_path(x, mask=mask).path == "triton"
            refused = core.choose_path(x.double())
            assert refused.path == "native" and refused.reason.endswith("(Triton kernels: dtype torch.float64)")
            refused = core.choose_path(x.double(), mask=mask.double() > 0)
            assert refused.path == "composed" and "Triton kernels: dtype" in refused.reason
            assert core.choose_path(torch.empty(2, 3, device="cpu")).path != "triton"
    finally:
        paths.register_gpu_kernels(None)


def test_auto_on_cuda_routes_what_torch_nn_lacks_and_leaves_plain_norms_to_torch(monkeypatch):
    """Issue 23's routing: under "auto" a CUDA call goes to the Triton kernels only where torch.nn
    has no single kernel for it; forced "triton" takes every call the kernels accept."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from normlab.core.running import RunningStats

    class TakesAll:
        def unavailable(self, x):
            return ""

        def takes(self, x, family, call, **kwargs):
            return True, ""

    monkeypatch.setattr(paths, "_PLAIN", (*paths._PLAIN, FakeTensor))
    paths.register_gpu_kernels(TakesAll())
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.empty(2, 3, 4, device="cuda")
            w = torch.empty(3, device="cuda")
            tracked = RunningStats.of(torch.zeros(3), torch.ones(3), torch.tensor(0))
            mask = torch.ones(2, 4, dtype=torch.bool, device="cuda")

            def channel(running=None, groups=-1, activation="identity", **kw):
                return core.choose_path(x, call=(w, w, running, groups, activation, None), **kw).path

            def row(residual=None):
                return core.choose_path(x, paths.ROW, call=((4,), None, residual)).path

            with core.use_backend("auto"):
                assert channel() == "native"  # BatchNorm without running estimates
                assert channel(running=tracked, given=True) == "native"  # eval BatchNorm
                assert channel(groups=1) == "native" and channel(groups=3) == "native"  # GroupNorm, InstanceNorm
                assert row() == "native"  # LayerNorm
                reason = core.choose_path(x, call=(w, w, None, -1, "identity", None)).reason
                assert "plain norm" in reason
                assert channel(running=tracked) == "triton"  # training: the update inside the one launch
                assert channel(activation="relu") == "triton" and channel(groups=1, activation="silu") == "triton"
                assert channel(inplace=True, activation="relu") == "triton"
                assert channel(groups=1, mask=mask) == "triton"
                assert row(residual=x) == "triton"
            with core.use_backend("triton"):
                assert channel() == "triton" and channel(groups=1) == "triton" and row() == "triton"
    finally:
        paths.register_gpu_kernels(None)


def test_forcing_triton_where_it_cannot_run_is_an_error_that_says_how_to_turn_it_on(monkeypatch):
    from normlab.core.kernels.triton import backend

    monkeypatch.setenv("NORMLAB_BACKEND", "triton")
    assert paths._initial_backend() == "triton"
    with core.use_backend("triton"):
        assert paths.status().startswith("backend 'triton'; Triton kernels run")
    cpu = torch.randn(2, 4)
    monkeypatch.setattr(backend, "INTERPRETED", False)  # as in a process started without the switch
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1 was not set" in backend.BACKEND.unavailable(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # set too late: triton has read it already
    why = backend.BACKEND.unavailable(cpu)
    assert "set now but was not when" in why and "once per process" in why
    with pytest.raises(RuntimeError, match="backend 'triton' was forced but .*once per process"):
        nl.nn.LayerNorm(4)(cpu)
    with core.use_backend("auto"):  # auto never asks the Triton kernels about a CPU tensor
        with core.record_dispatch() as log:
            nl.nn.LayerNorm(4)(cpu)
        assert log[0][1] != "triton"


# --- launches and the toolchain ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, shape, extra",
    [
        (lambda: nl.nn.BatchNorm2d(3), (2, 3, 2, 2), ()),
        (lambda: nl.nn.GroupNorm(2, 4), (2, 4, 5), ("mask",)),
        (lambda: nl.nn.BatchNormAct2d(3, activation="leaky_relu", inplace=True), (2, 3, 2, 2), ()),
        (lambda: nl.nn.AddRMSNorm(4), (2, 3, 4), ("residual",)),
    ],
    ids=["batchnorm2d", "masked-groupnorm", "in-place", "add-rms-norm"],
)
def test_one_launch_each_way(make, shape, extra):
    m = make().to(DEVICE)
    x = torch.randn(shape, device=DEVICE, requires_grad=True) * 1.0
    args = []
    if "mask" in extra:
        args.append(torch.rand(shape[0], shape[-1], device=DEVICE) > 0.3)
    if "residual" in extra:
        args.append(torch.randn(shape, device=DEVICE))
    with tk.count_launches() as forward:
        y = m(x, *args)
    y = y[0] if isinstance(y, tuple) else y
    with tk.count_launches() as backward:
        y.sum().backward()
    assert (forward[0], backward[0]) == (1, 1)


def test_compiled_fullgraph_runs_the_kernels_once_each_way_and_updates_once():
    m = nl.nn.BatchNormAct2d(3, activation="silu").to(DEVICE)
    eager = copy.deepcopy(m)
    x = torch.randn(2, 3, 2, 2, device=DEVICE)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    xc = x.clone().requires_grad_()
    with tk.count_launches() as forward:
        y = compiled(xc)
    with tk.count_launches() as backward:
        y.sum().backward()
    y_e, dx_e, _, log = _step(eager, x, torch.ones_like(x))
    assert [path for _, path, _ in log] == ["triton"]
    if DEVICE == "cpu":  # interpreted: the operators run as opaque nodes, launched eagerly
        assert (forward[0], backward[0]) == (1, 1)
    torch.testing.assert_close(y.detach(), y_e, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(xc.grad, dx_e, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m.running_var, eager.running_var, atol=1e-6, rtol=1e-6)
    assert int(m.num_batches_tracked) == 1


def test_export_takes_torch_ops_and_the_triton_operators_export_with_their_fake_kernels():
    with core.record_dispatch() as log:
        program = torch.export.export(nl.nn.LayerNorm(6).to(DEVICE), (torch.randn(2, 6, device=DEVICE),))
    assert [n.target for n in program.graph.nodes if n.op == "call_function"] == [torch.ops.aten.layer_norm.default]
    assert log == [("layer_norm", "native", "export/trace: torch's own norm ops")]  # exporters know them

    class Add(torch.nn.Module):
        def forward(self, x, r):
            return torch.ops.normlab.triton_row_norm(x, r, None, None, 6, 1e-5, True)[0]

    x, r = torch.randn(2, 6, device=DEVICE), torch.randn(2, 6, device=DEVICE)
    program = torch.export.export(Add(), (x, r))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.normlab.triton_row_norm.default) == 1
    torch.testing.assert_close(program.module()(x, r), Add()(x, r))


def test_meta_tensors_take_the_fake_kernels():
    m = nl.nn.BatchNormAct2d(3, activation="relu").to("meta")
    with core.record_dispatch() as log:
        y = m(torch.empty(2, 3, 4, 4, device="meta"))
    assert y.shape == (2, 3, 4, 4) and y.device.type == "meta"
    assert [path for _, path, _ in log] == ["triton"]
