"""What a module keeps between calls — its checked settings, its running-statistics policy, the
class's choice of input check — follows every change a user makes between calls: each case
changes one thing on a normlab layer and on its torch.nn twin, then compares a training step and
an eval call (outputs, input gradient and buffers) with torch.nn's."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import normlab as nl


def _pair(make_torch, make_ours):
    torch.manual_seed(0)
    ref = make_torch()
    ours = make_ours()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _bn_pair():
    return _pair(lambda: nn.BatchNorm2d(3), lambda: nl.nn.BatchNorm2d(3))


def _same_steps(ref, ours, x, rtol=1e-5, atol=1e-6):
    """One training call with backward, then one eval call, on both; everything compared."""
    for layer in (ref, ours):
        layer.train()
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ys = [layer(xi) for layer, xi in zip((ref, ours), xs, strict=True)]
    for y in ys:
        y.backward(torch.ones_like(y))
    torch.testing.assert_close(ys[1], ys[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=rtol, atol=atol)
    for (name, b_ref), (_, b_ours) in zip(ref.named_buffers(), ours.named_buffers(), strict=True):
        torch.testing.assert_close(b_ours, b_ref, rtol=rtol, atol=atol, msg=name)
    for layer in (ref, ours):
        layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=rtol, atol=atol)


_X = torch.randn(4, 3, 5, 5) * 2 + 1


def test_a_momentum_assigned_between_calls_is_used_at_the_next():
    ref, ours = _bn_pair()
    _same_steps(ref, ours, _X)
    ref.momentum = ours.momentum = 0.5
    _same_steps(ref, ours, _X)
    ref.momentum = ours.momentum = None  # the cumulative average, counted from num_batches_tracked
    _same_steps(ref, ours, _X)


def test_an_eps_assigned_between_calls_is_used_and_checked_at_the_next():
    ref, ours = _bn_pair()
    _same_steps(ref, ours, _X)
    ref.eps = ours.eps = 0.5
    _same_steps(ref, ours, _X)
    ours.eps = -1.0
    with pytest.raises(ValueError, match="eps"):
        ours(_X)


def test_the_dtype_and_buffers_follow_to_and_double():
    ref, ours = _bn_pair()
    _same_steps(ref, ours, _X)
    ref.double()
    ours.double()
    assert ours.running_mean.dtype == torch.float64
    _same_steps(ref, ours, _X.double())  # (the buffers carry the float32 steps' rounding)
    ref.to(torch.float32)
    ours.to(torch.float32)
    _same_steps(ref, ours, _X)


def test_a_state_dict_loaded_between_calls_is_what_the_next_call_uses():
    ref, ours = _bn_pair()
    _same_steps(ref, ours, _X)
    other = nn.BatchNorm2d(3)
    with torch.no_grad():
        other.running_mean.fill_(3.0)
        other.running_var.fill_(4.0)
        other.weight.fill_(2.0)
    buffer = io.BytesIO()
    torch.save(other.state_dict(), buffer)
    for layer in (ref, ours):
        buffer.seek(0)
        layer.load_state_dict(torch.load(buffer))
    _same_steps(ref, ours, _X)


def test_a_buffer_or_parameter_replaced_by_assignment_is_the_one_used():
    ref, ours = _bn_pair()
    _same_steps(ref, ours, _X)
    for layer in (ref, ours):
        layer.running_mean = torch.full((3,), 0.5)
        layer.weight = nn.Parameter(torch.full((3,), 1.5))
    _same_steps(ref, ours, _X)


def test_track_running_stats_switched_off_between_calls():
    ref, ours = _bn_pair()
    _same_steps(ref, ours, _X)
    ref.track_running_stats = ours.track_running_stats = False
    _same_steps(ref, ours, _X)


def test_requires_grad_switched_between_calls():
    ref, ours = _bn_pair()
    for layer in (ref, ours):
        layer.requires_grad_(False)
    _same_steps(ref, ours, _X)
    assert ours.weight.grad is None
    for layer in (ref, ours):
        layer.requires_grad_(True)
    _same_steps(ref, ours, _X)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


def test_forward_hooks_registered_between_calls_run():
    ref, ours = _bn_pair()
    _same_steps(ref, ours, _X)
    seen = []
    handle = ours.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    pre = ours.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    ref_pre = ref.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    _same_steps(ref, ours, _X)
    assert seen == [_X.shape, _X.shape]
    handle.remove()
    pre.remove()
    ref_pre.remove()
    _same_steps(ref, ours, _X)


def test_a_layer_frozen_then_unfrozen_between_calls():
    ref, ours = _bn_pair()
    _same_steps(ref, ours, _X)
    ours.freeze()
    before = ours.running_mean.clone()
    ours.train()
    ours(_X)
    assert torch.equal(ours.running_mean, before)  # frozen: normalizes with the estimates, updates nothing
    ours.unfreeze()
    ref.load_state_dict(ours.state_dict())
    _same_steps(ref, ours, _X)


def test_the_row_norms_follow_eps_and_parameters_assigned_between_calls():
    ref, ours = _pair(lambda: nn.LayerNorm(8), lambda: nl.nn.LayerNorm(8))
    x = torch.randn(3, 8)
    _same_steps(ref, ours, x)
    ref.eps = ours.eps = 0.25
    _same_steps(ref, ours, x)
    for layer in (ref, ours):
        layer.weight = nn.Parameter(torch.linspace(0.5, 2.0, 8))
    _same_steps(ref, ours, x)
    ref, ours = _pair(lambda: nn.RMSNorm(8), lambda: nl.nn.RMSNorm(8))
    _same_steps(ref, ours, x)
    ref.eps = ours.eps = 0.25
    _same_steps(ref, ours, x)


@pytest.mark.parametrize("base", [nn.BatchNorm2d, nl.nn.BatchNorm2d, nl.nn.BatchNormAct2d])
def test_a_subclass_overriding_check_input_dim_has_its_check_called(base):
    """torch.nn's forward calls ``_check_input_dim``; subclasses override it (to accept another
    rank, to refuse more). normlab's forward tests the common case inline, and a subclass that
    overrides the check gets its own called, on every call."""
    calls = []

    class Lenient(base):
        def _check_input_dim(self, input):
            calls.append(input.dim())
            if input.dim() not in (3, 4):
                raise ValueError(f"Lenient: expected 3D or 4D input (got {input.dim()}D input)")

    layer = Lenient(3) if base is not nl.nn.BatchNormAct2d else Lenient(3, activation="identity")
    layer(torch.randn(2, 3, 4, 4))
    layer(torch.randn(2, 3, 7))  # 3-D: refused by BatchNorm2d's own check, accepted here
    assert calls == [4, 3]
    with pytest.raises(ValueError, match="Lenient"):
        layer(torch.randn(2, 3))
    if base is not nn.BatchNorm2d:  # normlab's: the plain class keeps its own check
        with pytest.raises(ValueError, match="4D"):
            base(3)(torch.randn(2, 3, 7))
