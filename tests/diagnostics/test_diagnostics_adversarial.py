"""Cases that fooled the Probe when it was probed adversarially, each with its truth
constructed: zero-initialized layers before activations that still pass gradient, weight
decay inside the update, an activation registered before its layer, a model whose own
forward never ran, the meta device, and activations rescaled by a normalization layer."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from normlab.diagnostics import Probe
from normlab.diagnostics.summaries import DEAD_SLOPE


def _kinds(probe) -> set[str]:
    return {f.kind for f in probe.findings()}


WIDTHS = [300, 280, 260, 240, 220, 200, 180, 160, 140, 120, 100]


def _deep(act):
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(WIDTHS[:-1], WIDTHS[1:]):
        layers += [nn.Linear(fan_in, fan_out), act()]
    return nn.Sequential(*layers)


def _autograd_dead_fraction(act: nn.Module, pre: torch.Tensor) -> float:
    leaf = pre.detach().clone().requires_grad_()
    copy.deepcopy(act)(leaf).backward(torch.ones_like(leaf))
    return (leaf.grad.abs().amax(0) < DEAD_SLOPE).float().mean().item()


@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU6(), nn.Hardswish(), nn.GELU(), nn.SiLU()], ids=type)
def test_a_zero_initialized_layer_before_its_activation_is_dead_only_where_autograd_says(act):
    """Zero-initialized layers are common (the last layer of a residual branch); on an
    input of exactly 0 ReLU passes no gradient, Hardswish passes half of it."""
    linear = nn.Linear(16, 32)
    nn.init.zeros_(linear.weight), nn.init.zeros_(linear.bias)
    model = nn.Sequential(linear, copy.deepcopy(act))
    x = torch.randn(64, 16)
    truth = _autograd_dead_fraction(act, linear(x))
    with Probe(model) as probe:
        model(x).sum().backward()
    assert probe.records("1")[0]["dead"] == truth
    assert ("dead_units" in _kinds(probe)) == (truth > 0.4)


def test_an_in_place_hardswish_is_not_guessed():
    model = nn.Sequential(nn.Linear(4, 8), nn.Hardswish(inplace=True))
    with Probe(model) as probe:
        model(torch.randn(8, 4))
    assert "dead" not in probe.records("1")[0]  # its input is overwritten; its output 0 is ambiguous


def _sigmoid_training(optimizer_of, *, hooked: bool = True):
    model = _deep(nn.Sigmoid)
    optimizer = optimizer_of(model.parameters())
    generator = torch.Generator().manual_seed(0)
    with Probe(model, optimizer=optimizer if hooked else None) as probe:
        for _ in range(3):
            x = torch.randn(256, 300, generator=generator)
            y = torch.randint(0, 100, (256,), generator=generator)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return probe


@pytest.mark.parametrize(
    "optimizer_of",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
        lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-2),
        lambda p: torch.optim.SGD(p, lr=0.1),
    ],
    ids=["sgd-momentum-decay", "adam-coupled-decay", "sgd"],
)
def test_weight_decay_in_the_update_does_not_hide_vanishing_gradients(optimizer_of):
    """A deep sigmoid MLP's first layer gets a gradient ~1e7x smaller than its last; with
    weight decay every layer's update is at least lr·wd of its weight — decay, not learning."""
    probe = _sigmoid_training(optimizer_of)
    assert probe.latest("relative_grad")["18"] / probe.latest("relative_grad")["0"] > 1e5  # the truth
    assert "vanishing_gradients" in _kinds(probe)


def test_decoupled_weight_decay_is_taken_out_of_the_update():
    """AdamW shrinks every weight by lr·wd (1% here) apart from its Adam step: the learning part of
    its first update is the whole first update of AdamW without decay (same state, same
    batch)."""
    decayed = _sigmoid_training(lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=10.0))
    plain = _sigmoid_training(lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0))
    for name in ("0", "18"):
        first_decayed, first_plain = decayed.records(name)[0], plain.records(name)[0]
        assert first_decayed["update_ratio"] != pytest.approx(first_plain["update_ratio"], rel=1e-3)
        assert first_decayed["learning_ratio"] == pytest.approx(first_plain["update_ratio"], rel=1e-3)


def test_without_decay_the_learning_ratio_is_the_update_ratio():
    probe = _sigmoid_training(lambda p: torch.optim.SGD(p, lr=0.1))
    assert probe.latest("learning_ratio") == probe.latest("update_ratio")


class _ActivationFirst(nn.Module):
    """The ReLU is registered before the Linear it follows."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.fc = nn.Linear(16, 32)
        self.out = nn.Linear(32, 1)
        with torch.no_grad():
            self.fc.bias[:24] = -100.0

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


def test_a_2d_output_has_its_units_on_dim_1_whatever_the_registration_order():
    model = _ActivationFirst()
    with Probe(model) as probe:
        model(torch.randn(32, 16)).sum().backward()
    assert probe.records("act")[0]["dead"] == 0.75
    assert "dead_units" in _kinds(probe)


def _read_warnings(probe) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe.findings()
    return [str(w.message) for w in caught]


def test_a_probe_that_recorded_nothing_says_so():
    nested = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with Probe(nested) as probe:
        nested[0](torch.randn(3, 4)).sum().backward()  # the probed model's own forward never runs
    assert any("recorded nothing" in w for w in _read_warnings(probe))
    evaluated = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    with Probe(evaluated) as probe:
        evaluated(torch.randn(3, 4))
    messages = _read_warnings(probe)
    assert any("recorded nothing" in w and "record_eval" in w for w in messages)
    trained = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with Probe(trained) as probe:
        trained(torch.randn(3, 4))
    assert not any("recorded nothing" in w for w in _read_warnings(probe))


def test_a_model_on_the_meta_device_is_named_unrecorded_not_a_crash():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.BatchNorm1d(8)).to("meta")
    with Probe(model) as probe:
        model(torch.randn(3, 4, device="meta")).sum().backward()
    assert probe.findings() == []  # reading works...
    assert set(probe.unrecorded) == {"0", "1", "2"}
    assert all("meta" in why for why in probe.unrecorded.values())  # ...and says why nothing is there


def test_activations_rescaled_by_a_norm_are_not_a_collapse():
    """The first ReLU sees the raw input (std ~600), the next ones come after a LayerNorm
    (std ~0.6): nothing shrinks with depth."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.ReLU(), nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )
    with Probe(model) as probe:
        model(torch.randn(64, 16) * 1000).sum().backward()
    assert probe.latest("std")["0"] / probe.latest("std")["5"] > 100  # the trap
    assert "collapse" not in _kinds(probe)


def test_a_collapse_after_the_last_norm_is_still_found():
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(64, 64), nn.LayerNorm(64)]
    for _ in range(8):
        linear = nn.Linear(64, 64)
        nn.init.normal_(linear.weight, 0.0, 0.01)
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.Tanh()]
    model = nn.Sequential(*layers)
    with Probe(model) as probe:
        model(torch.randn(64, 64)).sum().backward()
    assert "collapse" in _kinds(probe)


@pytest.mark.parametrize(
    "act, flat",
    [
        (nn.Hardtanh(-2.0, 2.0), lambda a: (a <= -2) | (a >= 2)),
        (nn.Hardtanh(), lambda a: (a <= -1) | (a >= 1)),
        (nn.Hardsigmoid(), lambda a: (a <= 0) | (a >= 1)),
        (nn.Tanh(), lambda a: a.abs() > 0.99),
    ],
    ids=["hardtanh_2", "hardtanh", "hardsigmoid", "tanh"],
)
def test_saturation_is_the_flat_part_of_the_activation_it_is(act, flat):
    """Hardtanh(−2, 2) is flat only at ±2: at 1.5 it passes the whole gradient."""
    torch.manual_seed(0)
    linear = nn.Linear(16, 32)
    with torch.no_grad():
        linear.weight.mul_(4)
    model = nn.Sequential(linear, act)
    x = torch.randn(64, 16)  # 2048 outputs: the sample is the whole output
    with Probe(model) as probe:
        out = model(x)
    assert probe.records("1")[0]["saturated"] == pytest.approx(flat(out).float().mean().item())
    edges, _ = probe.histogram("1")
    assert edges[0] <= out.min().item() and edges[-1] >= out.max().item()  # the range covers its outputs


@pytest.mark.parametrize(
    "arguments",
    [{"bins": 0}, {"bins": 2.5}, {"sample_size": 0}, {"sample_size": True}, {"budget": 2.0}, {"budget": 1}],
)
def test_probe_arguments_that_cannot_work_are_refused_up_front(arguments):
    with pytest.raises((ValueError, TypeError), match=next(iter(arguments))):
        Probe(nn.Sequential(nn.Linear(4, 4)), **arguments)


class _LSTMReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 16, batch_first=True)
        self.act = nn.ReLU()
        with torch.no_grad():  # gates i, f, g, o: input gate open, cell input −1 on 12 of 16 units
            self.rnn.bias_ih_l0[:16] = 100.0
            self.rnn.bias_ih_l0[32:44] = -100.0

    def forward(self, x):
        return self.act(self.rnn(x)[0])


def test_dead_units_after_an_lstm_are_its_hidden_units():
    """h = o · tanh(c) with c ≤ −1 on 12 of 16 hidden units: the ReLU after it is dead
    there, at every time step — the hidden units are the last dim, not time."""
    torch.manual_seed(0)
    model, x = _LSTMReLU(), torch.randn(4, 20, 8)
    with torch.no_grad():
        hidden = model.rnn(x)[0]
    truth = (hidden.reshape(-1, 16).amax(0) <= 0).float().mean().item()
    with Probe(model) as probe:
        model(x).sum().backward()
    assert truth == 0.75 and probe.records("act")[0]["dead"] == truth


class _Offset(nn.Module):
    def forward(self, x):
        return x + 1e6


def test_a_float64_model_is_summarized_in_float64():
    """Outputs near 1e6 with std 0.2: float32 holds them in steps of 1/16, which moved
    the std by 2%; a float64 model's numbers keep its precision."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), _Offset(), nn.ReLU()).double()
    with Probe(model) as probe:
        out = model(torch.randn(64, 8, dtype=torch.float64))
    record = probe.records("2")[0]  # 512 values: the sample is the whole output
    assert record["std"] == pytest.approx(out.std(correction=0).item(), rel=1e-9)
    assert record["p50"] == pytest.approx(out.quantile(0.5).item(), rel=1e-12)


def test_the_drift_of_a_float64_batchnorm_keeps_its_precision():
    bn = nn.BatchNorm1d(4).double()
    with torch.no_grad():
        bn.running_mean.fill_(1e6)
        bn.running_var.fill_(1e-4)
    x = 1e6 + 0.01 * torch.randn(256, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    truth = ((x - 1e6).mean(0).abs() / (1e-4 + bn.eps) ** 0.5).mean().item()  # deviations first: exact
    with Probe(nn.Sequential(bn)) as probe:
        probe.model(x)
    assert probe.records("0")[0]["mean_drift"] == pytest.approx(truth, rel=1e-9)


class _NoLearningRate(torch.optim.Optimizer):
    """A custom optimizer with decay and no numeric learning rate in its groups."""

    def __init__(self, params):
        super().__init__(params, {"lr": None, "weight_decay": 0.1, "decoupled_weight_decay": True})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(0.99).add_(p.grad, alpha=-0.01)


def test_a_custom_optimizer_without_a_numeric_learning_rate_trains_unchanged():
    finals = []
    for probed in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        optimizer = _NoLearningRate(model.parameters())
        probe = Probe(model, optimizer=optimizer).attach() if probed else None
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(5, 4, generator=torch.Generator().manual_seed(1))).sum().backward()
            optimizer.step()
        if probe:
            records = probe.records("0")
            assert "update_ratio" in records[0] and "learning_ratio" not in records[0]  # cannot be split
            probe.detach()
        finals.append(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(finals[0].values(), finals[1].values()))
