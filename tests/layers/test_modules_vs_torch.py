"""normlab.nn against torch.nn: outputs, all gradients, running statistics, train and eval.

Property-based over layer kind, shape (including N = 1 where valid and odd sizes),
memory layout, dtype, momentum, affine and tracking flags.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import LAYOUTS, assert_close_scaled, in_layout, pair, run_step
from hypothesis import given
from hypothesis import strategies as st

import normlab as nl

# every test here runs once per backend (conftest.BACKENDS)
pytestmark = pytest.mark.usefixtures("backend")

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}

# name → (spatial rank, whether N * spatial must exceed 1 / spatial must exceed 1)
TRACKED = {
    "BatchNorm1d": (0, "batch"),
    "BatchNorm2d": (2, "batch"),
    "BatchNorm3d": (3, "batch"),
    "InstanceNorm1d": (1, "spatial"),
    "InstanceNorm2d": (2, "spatial"),
    "InstanceNorm3d": (3, "spatial"),
}


@st.composite
def tracked_cases(draw):
    name = draw(st.sampled_from(sorted(TRACKED)))
    rank, needs = TRACKED[name]
    if name == "BatchNorm1d":
        rank = draw(st.sampled_from([0, 1]))
    n = draw(st.integers(1, 4))
    c = draw(st.integers(1, 5))
    spatial = [draw(st.integers(1, 5)) for _ in range(rank)]
    if needs == "batch" and n * math.prod(spatial) < 2:
        n = 2
    if needs == "spatial" and math.prod(spatial) < 2:
        spatial[-1] = 3
    return dict(
        name=name,
        shape=(n, c, *spatial),
        layout=draw(st.sampled_from(LAYOUTS)),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        momentum=draw(st.sampled_from([0.1, 0.5, 1.0, None])),
        affine=draw(st.booleans()),
        track=draw(st.booleans()),
        steps=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _close(a, b, tol, what, truth=None):
    """a ≈ b, with tolerances that scale with the tensor's largest entry.

    For float32, ``truth`` (the float64 result) may be given: then normlab must be within
    ``tol`` of torch.nn *or* no further from the truth than torch.nn itself is (ill-
    conditioned cases — two-element groups, tiny variances — move both by more than tol).
    """
    if a is None or b is None:
        assert a is None and b is None, what
        return
    if truth is not None:
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        ours_err = (a.double() - truth).abs().max().item()
        torch_err = (b.double() - truth).abs().max().item()
        if ours_err <= max(2 * torch_err, tol * scale):
            return
    assert_close_scaled(a, b, rtol=tol, what=what)


def _compare_step(theirs, ours, x, tol, label):
    """normlab sees ``x`` in the layout under test; torch.nn the same values contiguous.

    torch.nn is the reference on its best-trodden path: its InstanceNorm backward gives
    wrong input gradients for some channels_last gradients (e.g. shape (1, 2, 1, 3)).
    """
    layout = "contiguous" if x.is_contiguous() else "channels_last"
    grad = in_layout(torch.randn(x.shape, dtype=x.dtype), layout)
    truth = None
    if x.dtype == torch.float32:
        exact = copy.deepcopy(theirs).double()
        truth = run_step(exact, x.double().contiguous(), grad.double().contiguous())
    yt, gxt, gpt = run_step(theirs, x.contiguous(), grad.contiguous())
    yo, gxo, gpo = run_step(ours, x, grad)
    _close(yo, yt, tol, f"{label} output", truth and truth[0])
    _close(gxo, gxt, tol, f"{label} input grad", truth and truth[1])
    assert gpo.keys() == gpt.keys()
    for k in gpt:
        _close(gpo[k], gpt[k], tol, f"{label} {k} grad", truth and truth[2][k])
    return yo


@given(tracked_cases())
def test_batch_and_instance_norm_match_torch(case):
    torch.manual_seed(case["seed"])  # each example reproducible on its own
    kwargs = dict(momentum=case["momentum"], affine=case["affine"], track_running_stats=case["track"])
    theirs, ours = pair(case["name"], case["shape"][1], dtype=case["dtype"], **kwargs)
    tol = TOL[case["dtype"]]
    is_instance = case["name"].startswith("Instance")
    # torch.nn's InstanceNorm ignores momentum=None (never updates): compared separately.
    compare_running = case["track"] and not (is_instance and case["momentum"] is None)
    for step in range(case["steps"]):
        x = in_layout(torch.randn(case["shape"], dtype=case["dtype"]) * 2 + 0.5, case["layout"])
        _compare_step(theirs, ours, x, tol, f"train step {step}")
        if compare_running:
            _close(ours.running_mean, theirs.running_mean, tol, "running_mean")
            _close(ours.running_var, theirs.running_var, tol, "running_var")
        if case["track"]:
            # torch.nn never counts batches for InstanceNorm; normlab does.
            expected = step + 1
            assert ours.num_batches_tracked.item() == expected
            if not is_instance:
                assert theirs.num_batches_tracked.item() == expected
    theirs.eval()
    ours.eval()
    x = in_layout(torch.randn(case["shape"], dtype=case["dtype"]), case["layout"])
    if compare_running or not case["track"]:
        _compare_step(theirs, ours, x, tol, "eval")


@st.composite
def per_sample_cases(draw):
    name = draw(st.sampled_from(["GroupNorm", "LayerNorm", "RMSNorm"]))
    n = draw(st.integers(1, 4))
    groups = draw(st.integers(1, 4))
    c = groups * draw(st.integers(1, 3))
    spatial = [draw(st.integers(1, 5)) for _ in range(draw(st.integers(0, 3)))]
    if name == "GroupNorm" and c // groups * math.prod(spatial) == 1:
        c *= 2  # a group of one value is an error in normlab (its output is only β)
    return dict(
        name=name,
        n=n,
        c=c,
        groups=groups,
        spatial=spatial,
        normalized_rank=draw(st.integers(1, 1 + len(spatial))),
        layout=draw(st.sampled_from(LAYOUTS)),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        affine=draw(st.booleans()),
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@given(per_sample_cases())
def test_group_layer_rms_norm_match_torch(case):
    torch.manual_seed(case["seed"])
    shape = (case["n"], case["c"], *case["spatial"])
    if case["name"] == "GroupNorm":
        theirs, ours = pair(
            "GroupNorm", case["groups"], case["c"], affine=case["affine"], bias=case["bias"], dtype=case["dtype"]
        )
    else:
        normalized = shape[-case["normalized_rank"] :]
        if case["name"] == "LayerNorm":
            theirs, ours = pair(
                "LayerNorm", normalized, elementwise_affine=case["affine"], bias=case["bias"], dtype=case["dtype"]
            )
        else:
            theirs, ours = pair("RMSNorm", normalized, elementwise_affine=case["affine"], dtype=case["dtype"])
    tol = TOL[case["dtype"]]
    x = in_layout(torch.randn(shape, dtype=case["dtype"]) * 3 + 1, case["layout"])
    _compare_step(theirs, ours, x, tol, "train")
    theirs.eval()
    ours.eval()
    _compare_step(theirs, ours, x, tol, "eval")


@pytest.mark.parametrize("name", ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"])
def test_unbatched_instance_norm_matches_torch(name):
    rank = int(name[-2])
    theirs, ours = pair(name, 3, affine=True, track_running_stats=True)
    x = torch.randn((3,) + (4,) * rank)
    _compare_step(theirs, ours, x, 2e-5, "unbatched")
    _close(ours.running_mean, theirs.running_mean, 1e-6, "running_mean")
    _close(ours.running_var, theirs.running_var, 1e-6, "running_var")


@pytest.mark.parametrize("layout", ["channels_last"])
@pytest.mark.parametrize("name", ["BatchNorm2d", "InstanceNorm2d"])
def test_channels_last_output_layout_is_torch_nns(name, layout):
    """BatchNorm keeps channels_last; InstanceNorm returns a contiguous tensor — as torch.nn."""
    theirs, ours = pair(name, 8, affine=True)
    x = in_layout(torch.randn(2, 8, 5, 5), layout).requires_grad_()
    y = ours(x)
    for fmt in (torch.channels_last, torch.contiguous_format):
        assert y.is_contiguous(memory_format=fmt) == theirs(x).is_contiguous(memory_format=fmt)
    y.sum().backward()


def test_group_norm_channels_last_3d_keeps_layout():
    gn = nl.nn.GroupNorm(2, 4)
    x = torch.randn(2, 4, 3, 3, 3).contiguous(memory_format=torch.channels_last_3d)
    assert gn(x).is_contiguous(memory_format=torch.channels_last_3d)


# --- float64 gradcheck through every module, train and eval --------------------------------

MODULE_GRADCHECK = {
    "BatchNorm1d": (lambda: nl.nn.BatchNorm1d(3), (4, 3, 5)),
    "BatchNorm2d": (lambda: nl.nn.BatchNorm2d(3), (3, 3, 2, 3)),
    "BatchNorm3d": (lambda: nl.nn.BatchNorm3d(3), (2, 3, 2, 2, 2)),
    "InstanceNorm1d": (lambda: nl.nn.InstanceNorm1d(3, affine=True, track_running_stats=True), (2, 3, 5)),
    "InstanceNorm2d": (lambda: nl.nn.InstanceNorm2d(3, affine=True, track_running_stats=True), (2, 3, 2, 3)),
    "InstanceNorm3d": (lambda: nl.nn.InstanceNorm3d(3, affine=True, track_running_stats=True), (2, 3, 2, 2, 2)),
    "GroupNorm": (lambda: nl.nn.GroupNorm(3, 6), (2, 6, 2, 3)),
    "LayerNorm": (lambda: nl.nn.LayerNorm((2, 3)), (4, 2, 3)),
    "RMSNorm": (lambda: nl.nn.RMSNorm((2, 3)), (4, 2, 3)),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", sorted(MODULE_GRADCHECK))
def test_module_gradcheck_float64(name, mode):
    factory, shape = MODULE_GRADCHECK[name]
    module = factory().double()
    with torch.no_grad():
        for buf_name, buf in module.named_buffers():
            if buf_name == "running_mean":
                buf.copy_(torch.randn_like(buf))
            elif buf_name == "running_var":
                buf.copy_(torch.rand_like(buf) + 0.5)
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    getattr(module, mode)()
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in module.named_parameters()]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

    def fn(x, *params):
        return torch.func.functional_call(module, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))
