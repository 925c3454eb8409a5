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


# --- issue 26: every layer frozen or listed, requires_grad and options kept ---------------------


def test_freeze_covers_torch_syncbatchnorm_and_unfreeze_restores_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    frozen, report = surgery.freeze_norms(model)
    assert [c.path for c in report.changes] == ["1"], report
    assert frozen[1].frozen and not frozen[1].weight.requires_grad
    frozen.train()
    before = frozen[1].running_mean.clone()
    frozen(torch.randn(4, 3, 5, 5))  # train mode, on the CPU, no process group: nothing moves
    assert torch.equal(frozen[1].running_mean, before)
    thawed, report = surgery.unfreeze_norms(frozen)
    assert type(thawed[1]) is nn.SyncBatchNorm and thawed[1].weight.requires_grad
    assert report.changes[0].after == "torch.nn.SyncBatchNorm"


def _one_bn_without_weight_grad():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model[1].weight.requires_grad_(False)
    return model


def _sync_of(model):
    return surgery.convert_sync_batchnorm(model).model


REQUIRES_GRAD_CASES = {
    "from_torch": lambda m: surgery.from_torch(m).model,
    "to_torch": lambda m: surgery.to_torch(surgery.from_torch(m).model).model,
    "freeze(affine=False)": lambda m: surgery.freeze_norms(m, affine=False).model,
    "unfreeze after freeze": lambda m: surgery.unfreeze_norms(surgery.freeze_norms(m).model).model,
    "unfreeze after freeze(affine=False)": lambda m: (
        surgery.unfreeze_norms(surgery.freeze_norms(m, affine=False).model).model
    ),
    "convert_sync_batchnorm": _sync_of,
    "revert_sync_batchnorm": lambda m: surgery.revert_sync_batchnorm(_sync_of(m)).model,
    "convert_norms(batch_renorm)": lambda m: surgery.convert_norms(m, "batch_renorm").model,
    "convert_norms(group)": lambda m: surgery.convert_norms(m, "group").model,
}


@pytest.mark.parametrize("transform", REQUIRES_GRAD_CASES.values(), ids=REQUIRES_GRAD_CASES.keys())
def test_requires_grad_false_survives_every_transform(transform):
    new = transform(_one_bn_without_weight_grad())
    assert not new[1].weight.requires_grad and new[1].bias.requires_grad
    assert new[0].weight.requires_grad


def test_tied_norm_parameters_stay_tied():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    model[1].weight = model[0].weight
    for name, transform in REQUIRES_GRAD_CASES.items():
        new = transform(model)
        assert new[1].weight is new[0].weight, name


def test_convert_keeps_the_freeze_and_the_options():
    source = nl.nn.BatchNorm2d(3, momentum=None, unbiased_running_var=False, on_nonfinite="raise")
    source.freeze(affine=False)
    converted, report = surgery.convert_norms(nn.Sequential(source), "batch_renorm")
    layer = converted[0]
    assert isinstance(layer, nl.nn.BatchRenorm2d)
    assert layer.frozen and not layer.frozen_affine and layer.weight.requires_grad
    assert layer.momentum is None and layer.unbiased_running_var is False and layer.on_nonfinite == "raise"
    untracked = nl.nn.BatchNorm2d(3, track_running_stats=False)
    converted, report = surgery.convert_norms(nn.Sequential(untracked), "batch_renorm")
    assert "fresh" in report.changes[0].detail["statistics"]  # BatchRenorm always keeps them
    assert any("track_running_stats=False" in note for note in report.notes), report
    dropped, report = surgery.convert_norms(nn.Sequential(source), "group")
    # GroupNorm keeps no statistics to freeze, nor these two options: each dropped with a note
    assert not dropped[0].frozen and dropped[0].weight.requires_grad
    notes = " ".join(report.notes)
    assert "unbiased_running_var=False" in notes and "on_nonfinite='raise'" in notes and "frozen" in notes


def test_freeze_with_affine_completes_a_freeze_without_it():
    layer = nl.nn.BatchNorm2d(3)
    layer.freeze(affine=False)
    frozen, report = surgery.freeze_norms(nn.Sequential(layer), affine=True)
    assert [c.path for c in report.changes] == ["0"] and not report.skipped
    assert frozen[0].frozen_affine and not frozen[0].weight.requires_grad
    again, report = surgery.freeze_norms(frozen, affine=True)
    assert not report.changes and "already frozen" in report.skipped[0].reason


def test_freeze_sync_revert_unfreeze_ends_where_it_started():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm1d(4))
    model[1].bias.requires_grad_(False)
    chains = {
        "freeze, sync, revert, unfreeze": (
            surgery.freeze_norms,
            surgery.convert_sync_batchnorm,
            surgery.revert_sync_batchnorm,
            surgery.unfreeze_norms,
        ),
        "freeze, sync, unfreeze, revert": (
            surgery.freeze_norms,
            surgery.convert_sync_batchnorm,
            surgery.unfreeze_norms,
            surgery.revert_sync_batchnorm,
        ),
        "sync, freeze, revert, unfreeze": (
            surgery.convert_sync_batchnorm,
            surgery.freeze_norms,
            surgery.revert_sync_batchnorm,
            surgery.unfreeze_norms,
        ),
    }
    for name, chain in chains.items():
        new = model
        for step in chain:
            new = step(new).model
        assert [type(m) for m in new] == [type(m) for m in model], name
        assert [p.requires_grad for p in new.parameters()] == [p.requires_grad for p in model.parameters()], name


class _MaskedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.masked, self.plain = nl.nn.BatchNorm1d(3), nl.nn.BatchNorm1d(3)

    def forward(self, x, mask):
        return self.plain(self.masked(x, mask=mask))


@pytest.mark.parametrize(
    "transform",
    [
        lambda m: surgery.convert_norms(m, "batch_renorm"),
        lambda m: surgery.convert_norms(m, "frozen"),
        lambda m: surgery.to_torch(m),
    ],
    ids=["batch_renorm", "frozen", "to_torch"],
)
def test_a_layer_called_with_a_mask_is_not_replaced_by_one_without(transform):
    model = _MaskedNet()
    new, report = transform(model)
    assert [c.path for c in report.changes] == ["plain"]
    assert [s.path for s in report.skipped] == ["masked"] and "mask=" in report.skipped[0].reason
    x, mask = torch.randn(4, 3, 5), torch.rand(4, 5) > 0.3
    new(x, mask)  # still runs


# --- found by tests/test_surgery_properties.py ------------------------------------------------


def test_a_layer_without_tensors_is_replaced_in_the_model_s_dtype():
    example = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    grouped = nn.Sequential(nn.Conv2d(3, 4, 1, dtype=torch.float64), nn.GroupNorm(2, 4, affine=False))
    converted, _ = surgery.convert_norms(grouped, "batch", example_input=example)  # its input's dtype
    assert converted[1].running_mean.dtype == torch.float64
    converted.train()(example)
    instance = nn.Sequential(nn.Conv2d(3, 4, 1, dtype=torch.float64), nn.InstanceNorm2d(4))
    converted, _ = surgery.convert_norms(instance, "batch")  # no example: the model's dtype
    assert converted[1].running_mean.dtype == torch.float64
    converted.train()(example)


def test_training_flags_of_single_layers_survive():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4)).train()
    model[1].eval()  # the usual recipe: one BatchNorm in eval inside a training model
    example = torch.randn(2, 3, 5, 5)
    surgery.fold_batchnorm(model, example_input=example)
    assert model.training and not model[1].training  # the input model: as it was
    converted, _ = surgery.convert_norms(model, "frozen", example_input=example)
    assert converted.training and converted[0].training and converted[3].training


def test_freeze_then_unfreeze_restores_tied_requires_grad():
    model = nn.Sequential(nl.nn.BatchNorm2d(4), nl.nn.BatchNorm2d(4))
    model[1].weight = model[0].weight  # one γ, two layers
    thawed = surgery.unfreeze_norms(surgery.freeze_norms(model).model).model
    assert thawed[0].weight is thawed[1].weight and thawed[0].weight.requires_grad


def test_unfreezing_a_gamma_tied_to_an_unfrozen_layer_says_so():
    model = nn.Sequential(nl.nn.BatchNorm2d(4), nl.nn.BatchNorm2d(4))
    model[1].weight = model[0].weight
    model[1].freeze()  # freezes the γ both hold
    thawed, report = surgery.unfreeze_norms(model)
    assert [c.path for c in report.changes] == ["1"] and report.changes[0].detail["shared_with"] == ["0"]
    assert "tied to 0" in " ".join(report.notes) and thawed[0].weight.requires_grad


def test_a_masked_norm_act_is_not_split_into_a_norm_and_an_activation():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            # 2d: a 1d layer without example_input is skipped for "instance" before its mask is
            # looked at (it may take (N, C))
            self.bn = nl.nn.BatchNormAct2d(3, activation="leaky_relu", activation_param=0.1)

        def forward(self, x, mask):
            return self.bn(x, mask=mask)

    new, report = surgery.convert_norms(Net(), "instance")
    assert not report.changes and "LeakyReLU takes no mask" in report.skipped[0].reason
    new(torch.randn(2, 3, 5, 4), torch.rand(2, 5, 4) > 0.3)


def test_unfreeze_gives_the_original_class_in_the_dtype_the_model_has_now():
    frozen = surgery.freeze_norms(nn.Sequential(nn.BatchNorm2d(3))).model.half()  # cast after freezing
    thawed = surgery.unfreeze_norms(frozen).model
    assert type(thawed[0]) is nn.BatchNorm2d
    assert thawed[0].weight.dtype == thawed[0].running_mean.dtype == torch.float16
    synced = surgery.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3))).model.double()
    assert surgery.revert_sync_batchnorm(synced).model[0].running_var.dtype == torch.float64


def test_a_model_that_is_one_norm_layer():
    frozen, report = surgery.freeze_norms(nn.BatchNorm2d(3))
    assert isinstance(frozen, nl.nn.BatchNorm2d) and frozen.frozen and report.changes[0].path == ""
    assert type(surgery.unfreeze_norms(frozen).model) is nn.BatchNorm2d


# --- the targets beyond the classic five keep the same rules --------------------------------


@pytest.mark.parametrize("to", ["frn", "evonorm_b0", "evonorm_s0", "group_ws"])
def test_beyond_channel_targets_keep_requires_grad_ties_and_masks(to):
    model = nn.Sequential(nl.nn.BatchNorm2d(4), nl.nn.BatchNorm2d(4))
    model[1].weight = model[0].weight  # one γ, two layers
    model[0].weight.requires_grad_(False)
    new, report = surgery.convert_norms(model, to)
    assert [c.path for c in report.changes if c.path in ("0", "1")] == ["0", "1"], report
    assert new[0].weight is new[1].weight and not new[0].weight.requires_grad
    if to == "group_ws":  # GroupNorm takes a mask
        return

    class Masked2d(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nl.nn.BatchNorm2d(4)

        def forward(self, x, mask):
            return self.bn(x, mask=mask)

    new, report = surgery.convert_norms(Masked2d(), to)
    assert not report.changes and "mask=" in report.skipped[0].reason, report
    new(torch.randn(2, 4, 3, 3), torch.rand(2, 3, 3) > 0.3)


@pytest.mark.parametrize("to", ["dyt", "derf"])
def test_beyond_squash_targets_keep_requires_grad_and_the_dtype(to):
    model = nn.Sequential(nn.Linear(4, 4, dtype=torch.float64), nn.LayerNorm(4, dtype=torch.float64))
    model[1].bias.requires_grad_(False)
    new, _ = surgery.convert_norms(model, to)
    assert new[1].weight.requires_grad and not new[1].bias.requires_grad
    plain = nn.Sequential(nn.Linear(4, 4, dtype=torch.float64), nn.LayerNorm(4, elementwise_affine=False))
    new, _ = surgery.convert_norms(plain, to)  # no tensors to say its dtype: the model's
    new(torch.randn(2, 4, dtype=torch.float64))


def test_a_freeze_of_statistics_alone_never_touches_requires_grad():
    frozen = surgery.freeze_norms(nn.Sequential(nl.nn.BatchNorm2d(4)), affine=False).model
    frozen[0].weight.requires_grad_(False)  # decided after the freeze
    assert not surgery.unfreeze_norms(frozen).model[0].weight.requires_grad
    assert not surgery.convert_norms(frozen, "group").model[0].weight.requires_grad


@pytest.mark.parametrize("kind", ["batch", "instance", "frozen", "batch_renorm"])
def test_build_norm_without_a_spatial_rank_names_what_is_missing(kind):
    from normlab.surgery.convert import build_norm
    from normlab.surgery.modules import describe_norm

    info = describe_norm(nn.BatchNorm2d(4))
    with pytest.raises(TypeError, match="spatial_rank is needed"):
        build_norm(kind, info, spatial_rank=None, groups=None, factory={})


def test_build_norm_for_groups_without_a_group_count_names_what_is_missing():
    from normlab.surgery.convert import build_norm
    from normlab.surgery.modules import describe_norm

    info = describe_norm(nn.BatchNorm2d(4))
    with pytest.raises(TypeError, match="needs groups"):
        build_norm("group", info, spatial_rank=2, groups=None, factory={})
    assert isinstance(build_norm("layer", info, spatial_rank=None, groups=None, factory={}), nl.nn.GroupNorm)
