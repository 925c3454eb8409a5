"""The Probe's findings against cases whose truth is constructed: units known dead or
alive (checked against autograd), drift known present or absent (computed over the valid
positions directly), half-precision outputs known finite, gradient accumulation with the
accumulated gradient known, long runs, non-finite steps, DDP and torch.compile."""

from __future__ import annotations

import copy
import datetime
import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normlab as nl
from normlab.diagnostics import Probe, dead_unit_rule
from normlab.diagnostics.summaries import DEAD_SLOPE


def _kinds(probe) -> set[str]:
    return {f.kind for f in probe.findings()}


def _finding(probe, kind):
    return next(f for f in probe.findings() if f.kind == kind)


# --- half precision: finite outputs are finite ------------------------------------------------


def _small_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, 10))
    with torch.no_grad():
        model[0].bias.fill_(0.5)
    return model


@pytest.mark.parametrize("precision", ["autocast-float16", "float16", "autocast-bfloat16", "bfloat16"])
def test_finite_half_precision_outputs_are_not_reported_non_finite(precision):
    model, x = _small_cnn(), torch.rand(32, 3, 32, 32)
    dtype = torch.float16 if precision.endswith("float16") and "bfloat" not in precision else torch.bfloat16
    if not precision.startswith("autocast"):
        model, x = model.to(dtype), x.to(dtype)
    outputs = {}
    model[1].register_forward_hook(lambda m, a, out: outputs.__setitem__("relu", out.detach().clone()))
    with Probe(model) as probe:
        with torch.autocast("cpu", dtype=dtype, enabled=precision.startswith("autocast")):
            model(x).float().sum().backward()
    relu = outputs["relu"]
    assert relu.dtype == dtype and torch.isfinite(relu).all()  # the truth: every value is finite
    if dtype == torch.float16:
        assert not torch.isfinite(relu.sum())  # ...and its float16 sum overflows (5.9e5 > 65504)
    assert [r["nonfinite"] for n in probe.layer_names for r in probe.records(n)] == [0] * len(probe.layer_names)
    assert "nonfinite" not in _kinds(probe)


@pytest.mark.parametrize("with_optimizer", [False, True])
def test_finite_half_precision_gradients_and_weights_are_not_reported_non_finite(with_optimizer):
    """Norms of float16 tensors are taken in float32: a gradient of 2000 in each of 4096
    entries is finite, its norm (128000) is not a float16 number."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU()).half()
    with torch.no_grad():
        model[0].weight.fill_(300.0)  # weight norm 19200, its square overflows float16 too
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0) if with_optimizer else None
    captured = {}

    def keep_output_grad(module, args, out):
        out.register_hook(lambda g: captured.__setitem__("g", g))

    model[0].register_forward_hook(keep_output_grad)
    with Probe(model, optimizer=optimizer) as probe:
        (model(torch.rand(64, 64, dtype=torch.float16) * 1e-3).float().sum() * 2000).backward()
        if optimizer:
            optimizer.step()
    grad = captured["g"]
    assert torch.isfinite(grad).all() and not torch.isfinite(torch.linalg.vector_norm(grad))  # the constructed case
    record = probe.records("0")[0]
    assert record["grad_nonfinite"] == 0 and record["weight_grad_nonfinite"] == 0
    assert record["grad_norm"] == pytest.approx(torch.linalg.vector_norm(grad.float()).item(), rel=1e-3)
    assert record["weight_norm"] == pytest.approx(19200.0, rel=1e-3)
    assert "nonfinite" not in _kinds(probe)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_true_non_finite_value_is_found_in_every_dtype(dtype, bad):
    model = _small_cnn().to(dtype)
    x = torch.rand(4, 3, 32, 32, dtype=dtype)
    x[0, 0, 5, 5] = bad
    with Probe(model) as probe:
        model(x)
    assert probe.records("0")[0]["nonfinite"] >= 1
    assert "nonfinite" in _kinds(probe)


# --- masked BatchNorm: drift over the valid positions ----------------------------------------


class _MaskedBN(nn.Module):
    def __init__(self, channels, positional=False):
        super().__init__()
        self.bn = nl.nn.BatchNorm1d(channels)
        self.positional = positional

    def forward(self, x, mask):
        return self.bn(x, mask) if self.positional else self.bn(x, mask=mask)


def _masked_batch(generator, mean=3.0, std=2.0, n=16, channels=4, length=20):
    lengths = torch.randint(4, length + 1, (n,), generator=generator)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)  # (N, L), True = valid
    x = torch.randn(n, channels, length, generator=generator) * std + mean
    return x * mask.unsqueeze(1), mask  # padding is 0, far from the valid mean


def _drift_over(x, mask, bn):
    """mean over channels of |μ_B − μ|/σ over the positions ``mask`` selects — by hand."""
    values = x.transpose(0, 1)[:, mask]  # (C, valid)
    sigma = torch.sqrt(bn.running_var + bn.eps)
    return ((values.mean(1) - bn.running_mean).abs() / sigma).mean().item()


@pytest.mark.parametrize("positional", [False, True])
def test_masked_batchnorm_drift_counts_valid_positions_only(positional):
    model = _MaskedBN(4, positional)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):  # running statistics converge to those of the valid positions
        model(*_masked_batch(generator))
    x, mask = _masked_batch(generator)
    truth = _drift_over(x, mask, model.bn)
    everything = _drift_over(x, torch.ones_like(mask), model.bn)
    with Probe(model) as probe:
        model(x, mask)
    recorded = probe.records("bn")[0]["mean_drift"]
    assert truth < 0.1 < 0.5 < everything  # the constructed case: no drift, unless padding counts
    assert recorded == pytest.approx(truth, rel=1e-4, abs=1e-6)
    assert "stat_drift" not in _kinds(probe)


def test_masked_batchnorm_drift_that_is_there_is_found():
    model = _MaskedBN(4)
    generator = torch.Generator().manual_seed(1)
    for _ in range(300):
        model(*_masked_batch(generator))
    x, mask = _masked_batch(generator, mean=7.0)  # valid data moved by 2 running σ
    truth = _drift_over(x, mask, model.bn)
    with Probe(model) as probe:
        model(x, mask)
    assert truth > 1.5
    assert probe.records("bn")[0]["mean_drift"] == pytest.approx(truth, rel=1e-4)
    assert _finding(probe, "stat_drift").layers == ["bn"]


# --- dead units: exactly the units autograd says pass no gradient -------------------------------


def _true_dead_fraction(act: nn.Module, pre: torch.Tensor, unit_dim: int = -1) -> float:
    """Units (along ``unit_dim``) whose activation slope is below DEAD_SLOPE at every
    position of the batch — by autograd on the activation itself."""
    leaf = pre.detach().clone().requires_grad_()
    copy.deepcopy(act)(leaf).backward(torch.ones_like(leaf))
    slope = leaf.grad.abs().movedim(unit_dim, -1)
    return (slope.reshape(-1, slope.shape[-1]).amax(0) < DEAD_SLOPE).float().mean().item()


ACTIVATION_CASES = {
    "relu": nn.ReLU(),
    "relu6": nn.ReLU6(),
    "leaky_relu_0.2": nn.LeakyReLU(0.2),
    "leaky_relu_0": nn.LeakyReLU(0.0),
    "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"),
    "elu": nn.ELU(),
    "elu_0.5": nn.ELU(alpha=0.5),
    "celu": nn.CELU(),
    "celu_2": nn.CELU(alpha=2.0),
    "selu": nn.SELU(),
    "silu": nn.SiLU(),
    "mish": nn.Mish(),
    "softplus": nn.Softplus(),
    "softplus_2_5": nn.Softplus(beta=2.0, threshold=5.0),
    "hardswish": nn.Hardswish(),
    "prelu": nn.PReLU(),
    "rrelu": nn.RReLU(),
}
BIASES = {
    "slightly_negative": lambda b: b.fill_(-0.5),  # the issue's case: every unit still passes gradient
    "half_far_negative": lambda b: (b.fill_(0.5), b[:16].fill_(-100.0)),
    "far_positive": lambda b: b.fill_(100.0),  # ReLU6 stuck at 6
}


@pytest.mark.parametrize("bias", list(BIASES))
@pytest.mark.parametrize("name", list(ACTIVATION_CASES))
def test_dead_fraction_is_the_fraction_of_units_passing_no_gradient(name, bias):
    torch.manual_seed(0)
    linear = nn.Linear(16, 32)
    with torch.no_grad():
        linear.weight.mul_(0.05)
        BIASES[bias](linear.bias)
    act = ACTIVATION_CASES[name]
    model = nn.Sequential(linear, copy.deepcopy(act))
    x = torch.randn(64, 16)
    truth = _true_dead_fraction(act, linear(x))
    with Probe(model) as probe:
        model(x).sum().backward()
    record = probe.records("1")[0]
    if dead_unit_rule(act) is None:  # LeakyReLU(0.2), PReLU, RReLU: a slope ≥ 1/8 everywhere
        assert truth == 0.0 and "dead" not in record
    else:
        assert record["dead"] == pytest.approx(truth)
    assert ("dead_units" in _kinds(probe)) == (truth > 0.4)


def test_the_issue_case_leaky_gelu_elu_silu_are_alive_and_relu_is_dead():
    for act, dead in [(nn.LeakyReLU(0.2), False), (nn.GELU(), False), (nn.ELU(), False), (nn.SiLU(), False)]:
        torch.manual_seed(0)
        linear = nn.Linear(16, 32)
        with torch.no_grad():
            linear.weight.mul_(0.05)
            linear.bias.fill_(-0.5)
        model = nn.Sequential(linear, act)
        with Probe(model) as probe:
            model(torch.randn(64, 16)).sum().backward()
        assert probe.records("1")[0].get("dead", 0.0) == 0.0, act
        assert ("dead_units" in _kinds(probe)) == dead


def test_in_place_activations_are_judged_by_their_output():
    torch.manual_seed(0)
    linear = nn.Linear(8, 16)
    with torch.no_grad():
        linear.bias[:12] = -100.0
    model = nn.Sequential(linear, nn.ReLU(inplace=True))
    with Probe(model) as probe:
        model(torch.randn(32, 8)).sum().backward()
    assert probe.records("1")[0]["dead"] == 0.75
    inplace_gelu = nn.Sequential(copy.deepcopy(linear), nn.SiLU(inplace=True))
    with Probe(inplace_gelu) as probe:
        inplace_gelu(torch.randn(32, 8))
    assert "dead" not in probe.records("1")[0]  # its input is overwritten: not measured, not guessed


# --- dead units on (batch, time, features) and conv outputs ---------------------------------


def test_dead_units_of_a_sequence_mlp_are_features_not_time_steps():
    torch.manual_seed(0)
    linear = nn.Linear(16, 64)
    with torch.no_grad():
        linear.bias[:48] = -100.0  # 48 of 64 features never positive, at any time step
    model = nn.Sequential(linear, nn.ReLU())
    x = torch.randn(8, 10, 16)
    truth = _true_dead_fraction(nn.ReLU(), linear(x), unit_dim=-1)
    with Probe(model) as probe:
        model(x).sum().backward()
    assert truth == 0.75
    assert probe.records("1")[0]["dead"] == truth
    assert _finding(probe, "dead_units").numbers["dead"] == {"1": 0.75}


def test_dead_units_of_a_conv_net_are_channels():
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 8, 3, padding=1)
    with torch.no_grad():
        conv.bias[:6] = -100.0
    model = nn.Sequential(conv, nn.ReLU())
    x = torch.randn(8, 4, 10)  # (N, C, L): a unit is a channel, over every sample and position
    truth = _true_dead_fraction(nn.ReLU(), conv(x), unit_dim=1)
    with Probe(model) as probe:
        model(x)
    assert truth == 0.75 and probe.records("1")[0]["dead"] == truth


def test_dead_units_of_a_fused_batchnorm_relu_and_units_after_dyt():
    bn_act = nl.nn.BatchNormAct2d(8, activation="relu")
    with torch.no_grad():
        bn_act.bias[:6] = -100.0  # β far below: relu(norm(x) + β) is 0 on 6 of 8 channels
    model = nn.Sequential(bn_act)
    x = torch.randn(4, 8, 5, 5)
    with Probe(model) as probe:
        out = model(x)
    truth = (out.transpose(0, 1).reshape(8, -1).amax(1) <= 0).float().mean().item()
    assert truth == 0.75 and probe.records("0")[0]["dead"] == truth
    transformer_mlp = nn.Sequential(nl.nn.DyT(16), nn.GELU())  # (batch, tokens, features)
    assert nl.diagnostics.unit_dims(transformer_mlp, Probe(transformer_mlp).layers) == {"0": -1, "1": -1}


class _ConvNeXtBlock(nn.Module):
    """A depthwise conv, then features last: Linear → GELU → Linear (ConvNeXt's layout)."""

    def __init__(self, dim=8):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        return self.pwconv2(self.act(self.pwconv1(y))).permute(0, 3, 1, 2)


def test_the_unit_dim_follows_the_layer_before_and_can_be_given():
    block = _ConvNeXtBlock()
    assert nl.diagnostics.unit_dims(block, Probe(block).layers)["act"] == -1
    with torch.no_grad():
        block.pwconv1.bias[:24] = -100.0  # 24 of 32 features dead everywhere
    x = torch.randn(2, 8, 5, 5)
    with Probe(block) as probe:
        block(x)
    assert probe.records("act")[0]["dead"] == 0.75
    # A ReLU with nothing before it on a 3-D input: its units are unknown, so no number...
    bare = nn.Sequential(nn.ReLU())
    with Probe(bare) as probe:
        bare(-torch.rand(4, 3, 6))
    assert "dead" not in probe.records("0")[0]
    # ...unless the caller says which dim holds them.
    with Probe(bare, unit_dim=-1) as probe:
        bare(torch.cat([-torch.rand(4, 3, 5), torch.rand(4, 3, 1)], dim=2))
    assert probe.records("0")[0]["dead"] == pytest.approx(5 / 6)


# --- gradient accumulation: one step, the accumulated gradient ---------------------------------


def _accumulating_run(probe_every: int | None, steps=6, micro=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = torch.Generator().manual_seed(1)
    truth = []
    probe = Probe(model, every=probe_every, optimizer=optimizer) if probe_every else None
    if probe:
        probe.attach()
    for _ in range(steps):
        optimizer.zero_grad()
        for _ in range(micro):
            model(torch.randn(5, 8, generator=data)).pow(2).mean().backward()
        weight = model[0].weight
        before, grad_norm = weight.detach().clone(), weight.grad.norm().item()
        optimizer.step()
        truth.append((grad_norm, (weight.detach() - before).norm().item() / before.norm().item()))
    if probe:
        probe.detach()
    return model, probe, truth


def test_gradient_accumulation_records_the_accumulated_gradient_and_update():
    model, probe, truth = _accumulating_run(probe_every=2)
    assert probe.step == 6  # optimizer steps, not forwards (24)
    records = probe.records("0")
    assert [r["step"] for r in records] == [1, 3, 5]
    for r in records:
        grad_norm, update_ratio = truth[r["step"] - 1]
        assert r["weight_grad_norm"] == pytest.approx(grad_norm, rel=1e-5)
        assert r["update_ratio"] == pytest.approx(update_ratio, rel=1e-5)
    # And the Probe changes nothing: the same run without it ends bit-identical.
    plain, _, _ = _accumulating_run(probe_every=None)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


class _SmoothMasked(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.bn = nl.nn.BatchNorm1d(8)
        self.act = nn.GELU()
        self.head = nn.Linear(8, 3)

    def forward(self, x, mask):
        y = self.act(self.bn(self.conv(x), mask=mask))
        return self.head((y * mask.unsqueeze(1)).sum(2))


def test_recording_changes_nothing_in_training():
    """Every hook (the slope by autograd, masked moments, weight and update captures)
    leaves the weights and running statistics bit-identical."""
    finals = []
    for probed in (False, True):
        torch.manual_seed(0)
        model = _SmoothMasked()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        data = torch.Generator().manual_seed(0)
        probe = Probe(model, optimizer=optimizer).attach() if probed else None
        for _ in range(5):
            x, mask = _masked_batch(data, channels=4)
            optimizer.zero_grad()
            model(x, mask).pow(2).mean().backward()
            optimizer.step()
        if probe:
            assert {"dead", "mean_drift", "update_ratio"} <= set(probe.records("act")[0]) | set(
                probe.records("bn")[0]
            ) | set(probe.records("conv")[0])
            probe.detach()
        finals.append(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(finals[0].values(), finals[1].values()))


def test_every_4_with_4_micro_batches_records_weights_every_4th_optimizer_step():
    _, probe, truth = _accumulating_run(probe_every=4, steps=9)
    records = probe.records("0")
    assert [r["step"] for r in records] == [1, 5, 9]
    assert all("weight_grad_norm" in r and "update_ratio" in r for r in records)


# --- learning speed, not raw gradient norms --------------------------------------------------


def _layer_norm_net():
    torch.manual_seed(0)
    blocks = [m for _ in range(3) for m in (nn.Linear(32, 32), nn.LayerNorm(32), nn.ReLU())]
    return nn.Sequential(*blocks, nn.Linear(32, 10))


@pytest.mark.parametrize("with_optimizer", [False, True])
def test_input_scale_alone_is_not_vanishing_gradients(with_optimizer):
    results = {}
    for scale in (1.0, 3000.0):
        model = _layer_norm_net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        generator = torch.Generator().manual_seed(0)
        with Probe(model, optimizer=optimizer if with_optimizer else None) as probe:
            for _ in range(3):
                x = torch.randn(64, 32, generator=generator) * scale
                y = torch.randint(0, 10, (64,), generator=generator)
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
        results[scale] = probe
    big = results[3000.0]
    grads = big.latest("grad_norm")
    assert grads["9"] / grads["0"] > 1e3  # the trap: the raw output-gradient norm does shrink 3000x
    key = "update_ratio" if with_optimizer else "relative_grad"
    first = {scale: p.latest(key)["0"] for scale, p in results.items()}
    assert first[3000.0] == pytest.approx(first[1.0], rel=0.1)  # ...but the first layer learns as fast
    assert "vanishing_gradients" not in _kinds(big)


WIDTHS = [300, 280, 260, 240, 220, 200, 180, 160, 140, 120, 100]


def _deep(act, std=None):
    torch.manual_seed(0)
    layers = []
    for fan_in, fan_out in zip(WIDTHS[:-1], WIDTHS[1:]):
        linear = nn.Linear(fan_in, fan_out)
        if std is not None:
            nn.init.normal_(linear.weight, 0.0, std)
        nn.init.zeros_(linear.bias)
        layers += [linear, act()]
    return nn.Sequential(*layers)


def _train_two_steps(model):
    with Probe(model) as probe:
        for _ in range(2):
            model.zero_grad()
            x, y = torch.randn(256, WIDTHS[0]), torch.randint(0, WIDTHS[-1], (256,))
            nn.functional.cross_entropy(model(x), y).backward()
    return probe


def test_a_deep_sigmoid_network_has_vanishing_gradients():
    probe = _train_two_steps(_deep(nn.Sigmoid))  # torch's default init: slope ≤ 1/4 per layer
    rates = probe.latest("relative_grad")
    linears = [str(i) for i in range(0, 20, 2)]
    assert all(rates[a] < rates[b] for a, b in zip(linears, linears[1:]))  # shrinking toward the input
    finding = _finding(probe, "vanishing_gradients")
    assert finding.layers == ["0", "18"] and finding.numbers["ratio_last_over_first"] > 1e3
    assert "exploding_gradients" not in _kinds(probe)


def test_a_deep_tanh_network_with_unit_weights_has_exploding_gradients():
    probe = _train_two_steps(_deep(nn.Tanh, std=1.0))  # gain ≈ √fan per layer, far above 1
    rates, grads = probe.latest("relative_grad"), probe.latest("grad_norm")
    linears = [str(i) for i in range(0, 20, 2)]
    assert all(rates[a] > rates[b] and grads[a] > grads[b] for a, b in zip(linears, linears[1:]))  # growing
    finding = _finding(probe, "exploding_gradients")
    assert finding.layers == ["0", "18"] and finding.numbers["ratio_first_over_last"] > 1e3
    assert "vanishing_gradients" not in _kinds(probe)


def test_small_init_tanh_collapses_but_every_layer_learns_at_the_same_rate():
    probe = _train_two_steps(_deep(nn.Tanh, std=0.01))
    rates = probe.latest("relative_grad")
    assert max(rates.values()) / min(rates.values()) < 10  # Glorot & Bengio's observation, Sec. 4.2.2
    kinds = _kinds(probe)
    assert "collapse" in kinds and "vanishing_gradients" not in kinds and "exploding_gradients" not in kinds


# --- long runs ------------------------------------------------------------------------------


def test_a_long_run_is_kept_from_start_to_end_with_bounded_memory():
    model = nn.Sequential(nn.Linear(3, 3))
    with Probe(model, budget=256) as probe:
        for _ in range(5000):
            model(torch.randn(2, 3))
    steps = [r["step"] for r in probe.records("0")]
    assert len(steps) <= 257 and steps[0] == 1 and steps[-1] == 5000
    gaps = {b - a for a, b in zip(steps[:-2], steps[1:-1])}
    assert len(gaps) == 1  # every k-th step (k = 32 here), then the latest
    assert sum(s <= 2500 for s in steps) >= 0.45 * len(steps)  # the first half is half the picture


# --- layers that are selected but cannot be recorded ----------------------------------------


class _Block(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm = nl.nn.AddRMSNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        attended, _ = self.attn(x, x, x)
        normed, _ = self.norm(attended, x)
        return self.fc(normed)


def test_a_tuple_output_is_recorded_by_its_first_tensor():
    block = _Block()
    captured = {}
    block.norm.register_forward_hook(lambda m, a, out: captured.__setitem__("y", out[0].detach().clone()))
    with Probe(block) as probe:
        block(torch.randn(4, 6, 16))
    assert "attn.out_proj" not in probe.layers  # MultiheadAttention never calls it
    assert probe.layer_names == ["norm", "fc"]
    assert probe.records("norm")[0]["std"] == pytest.approx(captured["y"].std(correction=0).item(), rel=1e-5)
    assert probe.unrecorded == {}


def test_a_selected_layer_that_never_runs_is_named_not_skipped_silently(tmp_path):
    block = _Block()
    with Probe(block, layers=["attn.out_proj", "fc"]) as probe:
        block(torch.randn(4, 6, 16))
    assert list(probe.unrecorded) == ["attn.out_proj"]
    assert "never called" in probe.unrecorded["attn.out_proj"]
    with pytest.warns(RuntimeWarning, match="attn.out_proj: never called"):
        probe.findings()
    assert "attn.out_proj" in probe.report(tmp_path / "r.html").read_text()


# --- after a NaN ----------------------------------------------------------------------------


def _nan_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, optimizer=optimizer) as probe:
        for step in range(1, 5):
            x = torch.randn(16, 4)
            if step == 3:
                x[0, 0] = math.nan  # from here on the weights are NaN
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()
    return model, probe


def test_update_ratio_of_nan_weights_is_nan_not_inf():
    model, probe = _nan_run()
    assert torch.isnan(model[0].weight).all()
    ratios = probe.series("0", "update_ratio")[1]
    assert all(math.isfinite(r) for r in ratios[:2])
    assert all(math.isnan(r) for r in ratios[2:])  # step 3 made them NaN, step 4 moved NaN


def test_json_after_a_nan_is_valid_json(tmp_path):
    _, probe = _nan_run()
    text = probe.to_json(tmp_path / "p.json").read_text()

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    data = json.loads(text, parse_constant=refuse)
    last = data["layers"]["0"]["records"][-1]
    assert last["grad_norm"] is None and last["grad_nonfinite"] == 1


def test_figures_after_a_nan_say_which_step_they_show():
    _, probe = _nan_run()
    grid = nl.diagnostics.histogram_grid(probe)
    panel = grid.axes[0].get_title()
    # Step 3's batch had one NaN row (its finite values still make a histogram); at step 4
    # every value is NaN: the panels show step 3 and say so.
    assert "step 3" in panel
    assert "step 4" not in grid.get_suptitle() and "step 3" in grid.get_suptitle()
    figure = nl.diagnostics.gradient_norms(probe)
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert "NaN/inf" in labels and "non-finite" in figure.axes[0].get_title()


# --- DDP ------------------------------------------------------------------------------------


def _ddp_worker(rank, port, out, rank_files):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
        with Probe(model, rank_files=rank_files) as probe:
            model(torch.randn(8, 4) + rank).sum().backward()
        written = probe.to_json(f"{out}/probe.json")
        with open(f"{out}/returned{rank}", "w") as handle:
            handle.write(str(written))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("rank_files", [False, True])
def test_under_ddp_rank_zero_writes_or_each_rank_its_own_file(tmp_path, rank_files):
    from normlab.experiments.distributed import _free_port

    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path), rank_files), nprocs=2, join=True)
    written = sorted(p.name for p in tmp_path.glob("probe*.json"))
    if rank_files:
        assert written == ["probe.rank0.json", "probe.rank1.json"]
        means = [json.loads((tmp_path / n).read_text())["layers"]["module.0"]["records"][0]["mean"] for n in written]
        assert means[0] != means[1]  # each rank recorded its own batch
    else:
        assert written == ["probe.json"]
        assert (tmp_path / "returned1").read_text() == "None"


# --- torch.compile --------------------------------------------------------------------------


def _compile_case():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.timeout(600)
def test_a_probe_on_a_compiled_model_records_the_eager_numbers_without_recompiling():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _compile_case(), _compile_case()
    probes = {"eager": Probe(eager, every=2).attach(), "compiled": Probe(torch.compile(compiled), every=2).attach()}
    run = {"eager": eager, "compiled": probes["compiled"].model}
    inputs = torch.Generator().manual_seed(0)
    graphs = []
    for step in range(10):
        x = torch.randn(8, 16, generator=inputs)
        for name in ("eager", "compiled"):
            run[name](x).sum().backward()
        if step in (3, 9):
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1]  # nothing compiled after the first recorded and unrecorded steps
    assert probes["compiled"].layer_names == probes["eager"].layer_names == ["0", "1", "2", "3"]
    for layer in probes["eager"].layer_names:
        want, got = probes["eager"].records(layer), probes["compiled"].records(layer)
        assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 3, 5, 7, 9]
        for key in ("std", "p50", "grad_norm"):
            assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=1e-4, abs=1e-6)
    torch._dynamo.reset()


@pytest.mark.timeout(600)
def test_compiling_a_model_after_attaching_its_probe_is_reported():
    torch._dynamo.reset()
    model = _compile_case()
    probe = Probe(model).attach()
    compiled = torch.compile(model)
    compiled(torch.randn(8, 16)).sum().backward()
    with pytest.warns(RuntimeWarning, match=r"Probe\(torch.compile\(model\)\)"):
        probe.findings()
    torch._dynamo.reset()


@pytest.mark.timeout(600)
def test_a_probe_attached_after_the_first_compiled_call_says_it_saw_nothing():
    torch._dynamo.reset()
    compiled = torch.compile(_compile_case())
    compiled(torch.randn(8, 16)).sum().backward()  # compiled without hooks
    probe = Probe(compiled).attach()
    compiled(torch.randn(8, 16)).sum().backward()
    assert probe.layer_names == [] and len(probe.unrecorded) == 4
    with pytest.warns(RuntimeWarning, match="attach the Probe before the compiled model's first call"):
        probe.findings()
    torch._dynamo.reset()
