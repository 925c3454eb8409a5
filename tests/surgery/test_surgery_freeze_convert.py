"""freeze_norms / unfreeze_norms, FrozenBatchNorm, convert_norms, and torch.nn interop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab as nl
from normlab import surgery


def _net(lib=nn):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        lib.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, bias=False),
        lib.GroupNorm(4, 12),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Flatten(),
        nn.Linear(12 * 2 * 2, 10),
        lib.LayerNorm(10),
    )


def _warm(model, steps=3):
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(6, 3, 6, 6) * 2 + 1)
    return model


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


# --- freezing -----------------------------------------------------------------------------


@pytest.mark.parametrize("lib", [nn, nl.nn], ids=["torch.nn", "normlab"])
def test_freeze_survives_model_train(lib):
    model = _warm(_net(lib))
    frozen, report = surgery.freeze_norms(model)
    assert {c.path for c in report.changes} == {"1", "4", "9"}
    reference = _net(lib)
    reference.load_state_dict(model.state_dict())
    reference.eval()
    frozen.train()  # the call that undoes torch.nn's bn.eval() recipe
    frozen[6].p = 0.0  # Dropout off, so train-mode outputs are comparable
    bn_before = _state(frozen[1])
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), reference(x), rtol=1e-5, atol=1e-5)
    for k, v in frozen[1].state_dict().items():
        assert torch.equal(v, bn_before[k]), k  # statistics did not move
    assert all(not p.requires_grad for m in (frozen[1], frozen[4], frozen[9]) for p in m.parameters())


def test_frozen_affine_is_not_trained_but_input_gradient_flows():
    frozen, _ = surgery.freeze_norms(_warm(_net()))
    frozen.train()
    before = {n: p.clone() for n, p in frozen.named_parameters()}
    opt = torch.optim.SGD([p for p in frozen.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    # Not .sum(): a LayerNorm output sums to Σβ whatever its input, so its gradient is 0.
    (frozen(x) * torch.randn(4, 10)).sum().backward()
    opt.step()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for n, p in frozen.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (n.startswith(("0.", "3.", "8."))), n  # only conv/linear weights train


def test_freeze_without_affine_keeps_gamma_beta_trainable():
    frozen, report = surgery.freeze_norms(_warm(_net()), affine=False)
    assert {c.path for c in report.changes} == {"1"}  # GN/LN have nothing else to freeze
    assert {s.path for s in report.skipped} == {"4", "9"}
    assert frozen[1].frozen and frozen[1].weight.requires_grad
    frozen.train()
    (frozen(torch.randn(4, 3, 6, 6)) * torch.randn(4, 10)).sum().backward()
    assert frozen[1].weight.grad is not None


def test_unfreeze_restores_types_state_and_training_behaviour():
    model = _warm(_net())
    frozen, _ = surgery.freeze_norms(model)
    thawed, report = surgery.unfreeze_norms(frozen)
    assert [type(m) for m in thawed] == [type(m) for m in model]
    assert len(report.changes) == 3
    for k, v in model.state_dict().items():
        assert torch.equal(thawed.state_dict()[k], v)
    assert all(p.requires_grad for p in thawed.parameters())
    thawed.train()
    thawed(torch.randn(4, 3, 6, 6) + 3)
    assert not torch.equal(thawed[1].running_mean, model[1].running_mean)  # updates again


@pytest.mark.parametrize(
    "factory,shape",
    [
        (lambda: nl.nn.BatchNorm2d(4), (3, 4, 5, 5)),
        (lambda: nl.nn.InstanceNorm2d(4, affine=True, track_running_stats=True), (3, 4, 5, 5)),
        (lambda: nl.nn.BatchRenorm2d(4), (3, 4, 5, 5)),
        (lambda: nl.nn.GroupNorm(2, 4), (3, 4, 5, 5)),
        (lambda: nl.nn.LayerNorm(5), (3, 4, 5)),
        (lambda: nl.nn.RMSNorm(5), (3, 4, 5)),
    ],
    ids=["bn", "in", "renorm", "gn", "ln", "rms"],
)
def test_every_normlab_norm_has_a_frozen_flag(factory, shape):
    layer = factory()
    layer.train()
    for _ in range(2):
        layer(torch.randn(shape) * 3 + 1)
    state = _state(layer)
    layer.freeze()
    layer.train()
    x = torch.randn(shape)
    y_frozen = layer(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(not p.requires_grad for p in layer.parameters())
    if getattr(layer, "running_mean", None) is not None:
        layer.eval()
        torch.testing.assert_close(y_frozen, layer(x))
    layer.unfreeze()
    assert not layer.frozen and all(p.requires_grad for p in layer.parameters())


# --- FrozenBatchNorm ------------------------------------------------------------------------


def test_frozen_batchnorm_defaults_to_identity():
    x = torch.randn(2, 5, 4, 4)
    torch.testing.assert_close(nl.nn.FrozenBatchNorm2d(5)(x), x, rtol=1e-6, atol=1e-6)


def test_frozen_batchnorm_with_only_weight_and_bias_is_their_affine_map():
    layer = nl.nn.FrozenBatchNorm2d(5)
    w, b = torch.randn(5), torch.randn(5)
    missing = layer.load_state_dict({"weight": w, "bias": b}, strict=False)
    assert not missing.unexpected_keys
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(layer(x), x * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1), rtol=1e-5, atol=1e-5)


def test_frozen_batchnorm_loads_a_batchnorm_checkpoint_and_matches_its_eval():
    bn = _warm(nn.Sequential(nn.BatchNorm2d(3)))[0].eval()
    frozen = nl.nn.FrozenBatchNorm2d(3)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    assert "num_batches_tracked" not in frozen.state_dict()
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    frozen.train()  # makes no difference
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-6, atol=1e-6)
    frozen(x).sum().backward()
    assert x.grad is not None
    assert not list(frozen.parameters())  # buffers, never trained
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d\(3\) expects 3 channels"):
        frozen(torch.randn(2, 4, 4, 4))


# --- conversion -----------------------------------------------------------------------------


def test_auto_groups():
    assert surgery.auto_groups(64) == 32
    assert surgery.auto_groups(48) == 24
    assert surgery.auto_groups(20) == 20
    assert surgery.auto_groups(96, max_groups=16) == 16
    assert surgery.auto_groups(7) == 7


def test_batch_to_group_transfers_affine_and_records_everything():
    model = _warm(_net())
    converted, report = surgery.convert_norms(model, "group")
    assert isinstance(converted[1], nl.nn.GroupNorm) and converted[1].num_groups == 8
    assert torch.equal(converted[1].weight, model[1].weight)
    assert torch.equal(converted[1].bias, model[1].bias)
    change = report.changes[0]
    assert change.path == "1" and change.detail["groups"] == 8 and "dropped" in change.detail["statistics"]
    skipped = {s.path: s.reason for s in report.skipped}
    assert "already a group norm" in skipped["4"]
    assert isinstance(converted[9], nn.LayerNorm)  # trailing-dims norms are not channel norms
    assert isinstance(model[1], nn.BatchNorm2d)  # input untouched


def test_explicit_groups_must_divide():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 8, 3), nn.BatchNorm2d(8))
    converted, report = surgery.convert_norms(model, "group", groups=4)
    assert [c.path for c in report.changes] == ["3"]
    assert "groups=4 does not divide its 6 channels" in report.skipped[0].reason
    with pytest.raises(ValueError, match="to must be one of"):
        surgery.convert_norms(model, "batchnorm")
    with pytest.raises(ValueError, match="groups must be a positive int or 'auto'"):
        surgery.convert_norms(model, "group", groups=0)


@pytest.mark.parametrize(
    "to,cls", [("frozen", nl.nn.FrozenBatchNorm2d), ("batch_renorm", nl.nn.BatchRenorm2d), ("batch", nl.nn.BatchNorm2d)]
)
def test_statistics_move_where_the_target_keeps_them(to, cls):
    model = _warm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    if to == "batch":
        model = surgery.convert_norms(model, "frozen").model  # start from frozen instead
    converted, report = surgery.convert_norms(model, to, example_input=torch.randn(2, 3, 6, 6))
    assert isinstance(converted[1], cls)
    assert report.changes[0].detail["statistics"] == "copied"
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-5


def test_group_to_batch_needs_the_spatial_rank():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8))
    _, report = surgery.convert_norms(model, "batch")
    assert not report.changes and "example_input" in report.skipped[0].reason
    converted, report = surgery.convert_norms(model, "batch", example_input=torch.randn(2, 3, 5, 5))
    assert isinstance(converted[1], nl.nn.BatchNorm2d)
    assert "fresh" in report.changes[0].detail["statistics"]
    converted, _ = surgery.convert_norms(model, "layer")
    assert isinstance(converted[1], nl.nn.GroupNorm) and converted[1].num_groups == 1
    converted, _ = surgery.convert_norms(model, "instance", example_input=torch.randn(2, 3, 5, 5))
    assert isinstance(converted[1], nl.nn.InstanceNorm2d) and converted[1].affine


# --- torch.nn interop -----------------------------------------------------------------------


def test_from_torch_and_back_is_bit_for_bit():
    model = _warm(_net())
    ours, report = surgery.from_torch(model)
    assert {c.path for c in report.changes} == {"1", "4", "9"}
    assert isinstance(ours[1], nl.nn.BatchNorm2d) and isinstance(ours[9], nl.nn.LayerNorm)
    back, _ = surgery.to_torch(ours)
    assert [type(m) for m in back] == [type(m) for m in model]
    for sd in (ours.state_dict(), back.state_dict()):
        assert sd.keys() == model.state_dict().keys()
        for k, v in model.state_dict().items():
            assert torch.equal(sd[k], v), k
    x = torch.randn(4, 3, 6, 6)
    for m in (model, ours, back):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), model(x), rtol=1e-5, atol=1e-6)
        assert torch.equal(back(x), model(x))  # the same torch.nn modules again


def test_subclasses_of_torch_layers_are_left_alone():
    class MyBN(nn.BatchNorm2d):
        pass

    _, report = surgery.from_torch(nn.Sequential(MyBN(3)))
    assert not report.changes


def test_to_torch_reports_what_torch_cannot_express():
    model = nn.Sequential(
        nl.nn.BatchNorm2d(3, unbiased_running_var=False),
        nl.nn.InstanceNorm2d(3, track_running_stats=True, momentum=None),
    )
    back, report = surgery.to_torch(model)
    assert isinstance(back[0], nn.BatchNorm2d)
    notes = " ".join(report.notes)
    assert "unbiased running variance" in notes and "momentum=None" in notes
    frozen = surgery.freeze_norms(model).model
    _, report = surgery.to_torch(frozen)
    assert not report.changes and "frozen" in report.skipped[0].reason


def test_keras_decay_statistics_import():
    mean, var = torch.randn(4), torch.rand(4) + 0.5
    gamma, beta = torch.rand(4) + 0.5, torch.randn(4)
    layer, report = surgery.load_decay_statistics(
        nl.nn.BatchNorm2d(4),
        moving_mean=mean,
        moving_variance=var,
        decay=0.99,
        gamma=gamma,
        beta=beta,
        epsilon=1e-3,
        elements_per_batch=101,
    )
    assert layer.momentum == pytest.approx(0.01) and layer.eps == 1e-3
    torch.testing.assert_close(layer.running_var, var * 101 / 100)
    torch.testing.assert_close(layer.weight.detach(), gamma)
    layer.eval()
    x = torch.randn(2, 4, 3, 3)
    keras = gamma.view(1, -1, 1, 1) * (x - mean.view(1, -1, 1, 1)) / torch.sqrt(
        var.view(1, -1, 1, 1) * 101 / 100 + 1e-3
    ) + beta.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), keras, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="moving_mean has shape"):
        surgery.load_decay_statistics(nl.nn.BatchNorm2d(3), moving_mean=mean, moving_variance=var, decay=0.9)
    with pytest.raises(ValueError, match="keeps no running statistics"):
        surgery.load_decay_statistics(nl.nn.GroupNorm(2, 4), moving_mean=mean, moving_variance=var, decay=0.9)
