"""BatchRenorm: the renormalization formula, its gradient, schedules, and BN as a special case."""

from __future__ import annotations

import pytest
import torch

import normlab as nl
import normlab.functional as F

# every test here runs once per backend (conftest.BACKENDS)
pytestmark = pytest.mark.usefixtures("backend")


def _reference(x, rm, rv, w, b, eps, r_max, d_max):
    """Ioffe (2017), Algorithm 1, written out; r and d detached."""
    dims = (0, 2, 3)
    mu = x.mean(dims, keepdim=True)
    sigma_b = torch.sqrt(x.var(dims, correction=0, keepdim=True) + eps)
    sigma = torch.sqrt(rv.view(1, -1, 1, 1) + eps)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mu - rm.view(1, -1, 1, 1)) / sigma).clamp(-d_max, d_max).detach()
    xhat = (x - mu) / sigma_b * r + d
    return w.view(1, -1, 1, 1) * xhat + b.view(1, -1, 1, 1)


def test_matches_the_paper_formula_values_and_gradients():
    x = (torch.randn(6, 4, 3, 3, dtype=torch.float64) * 3 + 2).requires_grad_()
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.2
    y = F.batch_renorm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, 1.5, 0.5)
    y_ref = _reference(x, rm, rv, w, b, 1e-5, 1.5, 0.5)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(y_ref, (x, w, b), dy)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    # The clips are active in this example (so the test is not BatchNorm in disguise).
    sigma_b = x.detach().var((0, 2, 3), correction=0).add(1e-5).sqrt()
    assert ((sigma_b / (rv + 1e-5).sqrt()) > 1.5).any()


def test_gradcheck_where_the_clips_hold_r_and_d_constant():
    # r and d are stop-gradient by design, so a finite-difference check only applies where
    # they are locally constant: both clipped. Then the analytical and numerical agree.
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm = torch.full((3,), 50.0, dtype=torch.float64)  # far from the batch mean: d = -d_max
    rv = torch.full((3,), 1e-3, dtype=torch.float64)  # much tighter than the batch: r = r_max
    assert torch.autograd.gradcheck(
        lambda x, w, b: F.batch_renorm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, 2.0, 1.0), (x, w, b)
    )


def test_unit_limits_are_exactly_batchnorm():
    renorm = nl.nn.BatchRenorm2d(4, schedule=nl.nn.RenormSchedule(r_max=1, d_max=0))
    bn = nl.nn.BatchNorm2d(4)
    bn.load_state_dict(renorm.state_dict())
    for _ in range(3):
        x = torch.randn(5, 4, 3, 3) * 2 + 1
        assert torch.equal(renorm(x), bn(x))
    assert torch.equal(renorm.running_var, bn.running_var)
    renorm.eval()
    bn.eval()
    x = torch.randn(5, 4, 3, 3)
    assert torch.equal(renorm(x), bn(x))


def test_schedule_warms_up_then_ramps():
    s = nl.nn.RenormSchedule(r_max=3, d_max=5, warmup_steps=10, ramp_steps=20)
    assert s.at(0) == (1.0, 0.0) and s.at(9) == (1.0, 0.0)
    assert s.at(20) == pytest.approx((2.0, 2.5))  # halfway up the ramp
    assert s.at(30) == (3.0, 5.0) and s.at(10_000) == (3.0, 5.0)
    layer = nl.nn.BatchRenorm1d(3, schedule=s)
    for _ in range(20):
        layer(torch.randn(8, 3))
    assert layer.current_limits() == pytest.approx((2.0, 2.5))
    with pytest.raises(ValueError, match=r"r_max must be >= 1"):
        nl.nn.RenormSchedule(r_max=0.5)
    with pytest.raises(ValueError, match="d_max must be a number >= 0"):
        F.batch_renorm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, d_max=-1.0)


def _trained(layer: torch.nn.Module) -> torch.nn.Module:
    """Non-default γ, β, running statistics and step count, so a load that drops or
    mixes up any of them shows in the state and in the outputs."""
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    for _ in range(3):
        layer(torch.randn(8, 4, 2, 2) * 2 + 1)
    return layer


def _assert_same_state_and_outputs(loaded: torch.nn.Module, source: torch.nn.Module) -> None:
    want, got = source.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys()
    for key in want:  # parameters and buffers (running_mean, running_var, num_batches_tracked)
        assert torch.equal(got[key], want[key]), key
    # In eval mode both are the same affine map of the running statistics.
    loaded.eval()
    source.eval()
    x = torch.randn(5, 4, 3, 3) * 2 + 1
    torch.testing.assert_close(loaded(x), source(x), rtol=1e-6, atol=1e-6)


def test_batchnorm_checkpoints_load_both_ways():
    bn = _trained(torch.nn.BatchNorm2d(4))
    renorm = nl.nn.BatchRenorm2d(4)
    renorm.load_state_dict(bn.state_dict())
    _assert_same_state_and_outputs(renorm, bn)

    renorm = _trained(nl.nn.BatchRenorm2d(4))
    bn = torch.nn.BatchNorm2d(4)
    bn.load_state_dict(renorm.state_dict())
    _assert_same_state_and_outputs(bn, renorm)


def test_needs_running_statistics():
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        F.batch_renorm(torch.randn(4, 3), None, None, training=True)


def test_vmap_over_a_training_batch_renorm_names_what_it_offers():
    """BatchRenorm has no track_running_stats, and torch.func.replace_all_batch_norm_modules_
    removes the estimates it measures every batch against: vmap's error names eval, freeze and
    per-call estimates instead, and each of those runs."""
    layer = nl.nn.BatchRenorm2d(3)
    x = torch.randn(4, 2, 3, 5, 5)
    with pytest.raises(RuntimeError) as caught:
        torch.func.vmap(layer)(x)
    message = str(caught.value)
    assert "track_running_stats=False" not in message and "Patch the model" not in message
    assert all(word in message for word in ("model.eval()", "freeze", "stack_module_state"))
    expected = torch.stack([nl.nn.BatchRenorm2d(3).eval()(v) for v in x])
    torch.testing.assert_close(torch.func.vmap(layer.eval())(x), expected)
    torch.testing.assert_close(torch.func.vmap(layer.train().freeze())(x), expected)
    # BatchNorm's message is unchanged: it can stop tracking
    with pytest.raises(RuntimeError, match="track_running_stats=False"):
        torch.func.vmap(nl.nn.BatchNorm2d(3))(x)


def _autograd_nodes(y: torch.Tensor) -> list[str]:
    seen, stack, names = set(), [y.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


def test_training_step_builds_no_view_nodes(backend):
    """The effective affine (γr, γd + β) is computed on (C,) tensors: at batch 2 a training
    step of a small network pays per autograd node, and views of γ and β added four."""
    if backend == "composed":
        pytest.skip("the composed path views γ' and β' itself")
    layer = nl.nn.BatchRenorm1d(8, schedule=nl.nn.RenormSchedule(3.0, 5.0, warmup_steps=1, ramp_steps=4))
    nodes = _autograd_nodes(layer(torch.randn(2, 8, 5, requires_grad=True)))
    assert not [n for n in nodes if n.startswith(("View", "Unsafe", "Reshape", "Squeeze", "Unsqueeze"))], nodes
    assert nodes.count("AccumulateGrad") == 3  # x, γ, β


def test_effective_affine_is_the_broadcast_formula():
    """γ' = γ·r and β' = γ·d + β per channel: the (1, C, 1) formula, through the schedule's ramp."""
    torch.manual_seed(3)
    layer = nl.nn.BatchRenorm1d(6, schedule=nl.nn.RenormSchedule(2.0, 1.0, warmup_steps=1, ramp_steps=3))
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    for step in range(5):
        x = torch.randn(2, 6, 7) * (1 + step) + step
        rm, rv = layer.running_mean.clone(), layer.running_var.clone()
        r_max, d_max = (t.to(torch.float32) for t in layer.schedule.limits(layer.num_batches_tracked))
        y = layer(x)
        sigma = (rv.view(1, -1, 1) + layer.eps).sqrt()
        shift = x.mean((0, 2), keepdim=True)
        c = x - shift
        var = ((c * c).mean((0, 2), keepdim=True) - c.mean((0, 2), keepdim=True) ** 2).clamp(min=0)
        r = ((var + layer.eps).sqrt() / sigma).clamp(r_max.reciprocal(), r_max)
        d = ((shift - rm.view(1, -1, 1)) / sigma).clamp(-d_max, d_max)
        w, b = layer.weight.detach().view(1, -1, 1), layer.bias.detach().view(1, -1, 1)
        w_eff, b_eff = (w * r).flatten(), (w * d + b).flatten()
        expected = torch.nn.functional.batch_norm(x, None, None, w_eff, b_eff, True, 0.0, layer.eps)
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
