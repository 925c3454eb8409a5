"""Probe records what it claims; findings fire on broken networks and not on healthy ones;
the report is self-contained HTML."""

from __future__ import annotations

import base64
import csv
import html
import inspect
import json
import math
import typing
from html.parser import HTMLParser

import pytest
import torch
from torch import nn

import normlab as nl
from normlab.diagnostics import Probe


class Scale(nn.Module):
    """y = x·s: a layer whose output statistics are known exactly."""

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        return x * self.s


def _identity_linear(n):
    layer = nn.Linear(n, n)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(n))
        layer.bias.zero_()
    return layer


def _zeroing_linear(n):
    layer = nn.Linear(n, n)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.fill_(-1.0)  # every pre-activation is -1: the ReLU after it outputs 0
    return layer


# --- what is recorded ----------------------------------------------------------------------


def test_identity_layers_keep_the_input_std_and_a_zeroed_relu_is_all_dead():
    model = nn.Sequential(_identity_linear(50), nn.ReLU(), _zeroing_linear(50), nn.ReLU())
    x = torch.randn(40, 50) * 3 + 1
    with Probe(model) as probe:
        model(x)
    first = probe.records("0")[0]
    assert first["std"] == pytest.approx(x.std(correction=0).item(), rel=1e-5)  # 2000 values: all kept
    assert first["mean"] == pytest.approx(x.mean().item(), rel=1e-5)
    assert probe.records("3")[0]["dead"] == 1.0
    assert probe.records("1")[0]["dead"] == 0.0  # every unit of identity(x) is positive somewhere
    assert probe.layer_names == ["0", "1", "2", "3"]


def test_percentiles_and_histogram_are_right():
    model = nn.Sequential(Scale(1.0))
    x = torch.randn(64, 64)  # 4096 values: used whole
    with Probe(model, layers=(Scale,), bins=20, hist_range=(-4.0, 4.0)) as probe:
        model(x)
    r = probe.records("0")[0]
    expected = torch.quantile(x.flatten(), torch.tensor([0.15, 0.5, 0.85])).tolist()
    assert [r["p15"], r["p50"], r["p85"]] == pytest.approx(expected, abs=1e-6)
    assert sum(r["hist"]) == pytest.approx(1.0)
    edges, fractions = probe.histogram("0")
    assert len(edges) == 21 and edges[0] == -4.0 and edges[-1] == 4.0
    inside = ((x >= edges[9]) & (x < edges[10])).float().mean().item()
    assert fractions[9] == pytest.approx(inside, abs=1e-6)


def test_large_outputs_are_sampled_and_still_accurate():
    model = nn.Sequential(Scale(2.0))
    x = torch.randn(100, 1000)  # 100 000 values, sampled to 4096
    with Probe(model, layers=(Scale,)) as probe:
        model(x)
    r = probe.records("0")[0]
    assert r["numel"] == 100_000
    assert r["std"] == pytest.approx(2.0, rel=0.05)
    assert r["p50"] == pytest.approx(0.0, abs=0.1)


def test_saturation_of_tanh_and_sigmoid():
    model = nn.Sequential(Scale(100.0), nn.Tanh(), nn.Sigmoid())
    with Probe(model) as probe:
        model(torch.randn(32, 32))
    assert probe.records("1")[0]["saturated"] > 0.95
    sig = probe.records("2")[0]["saturated"]  # tanh outputs in (-1, 1) stay inside sigmoid's band
    assert sig == 0.0


def test_gradients_weights_and_update_ratio_are_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    captured = {}

    def keep_output_grad(module, args, out):
        out.register_hook(lambda g: captured.__setitem__("g", g.clone()))

    model[0].register_forward_hook(keep_output_grad)
    with Probe(model, optimizer=opt) as probe:
        x = torch.randn(16, 8)
        before = model[0].weight.detach().clone()
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        grad = model[0].weight.grad.clone()
        opt.step()
    r = probe.records("0")[0]
    assert r["grad_norm"] == pytest.approx(captured["g"].norm().item(), rel=1e-5)
    assert r["grad_std"] == pytest.approx(captured["g"].std(correction=0).item(), rel=1e-5)
    assert r["weight_grad_norm"] == pytest.approx(grad.norm().item(), rel=1e-5)
    assert r["weight_norm"] == pytest.approx(before.norm().item(), rel=1e-5)
    expected_ratio = (model[0].weight.detach() - before).norm().item() / before.norm().item()
    assert r["update_ratio"] == pytest.approx(expected_ratio, rel=1e-5)


def test_weight_gradients_without_an_optimizer():
    model = nn.Sequential(nn.Linear(4, 3))
    with Probe(model) as probe:
        model(torch.randn(5, 4)).sum().backward()
    assert probe.records("0")[0]["weight_grad_norm"] == pytest.approx(model[0].weight.grad.norm().item())


def test_batchnorm_drift_between_batch_and_running_statistics():
    bn = nl.nn.BatchNorm1d(4)  # running mean 0, var 1
    model = nn.Sequential(bn)
    x = torch.randn(4096, 4) * 2 + 3  # batch mean 3, std 2
    with Probe(model) as probe:
        model(x)
    r = probe.records("0")[0]
    assert r["mean_drift"] == pytest.approx(3.0, abs=0.1)
    assert r["std_drift"] == pytest.approx(1.0, abs=0.1)


def test_sampling_every_k_steps_and_eval_forwards():
    model = nn.Sequential(nn.Linear(3, 3))
    with Probe(model, every=3) as probe:
        for _ in range(7):
            model(torch.randn(2, 3))
        model.eval()
        model(torch.randn(2, 3))  # not a training step: neither counted nor recorded
    assert probe.step == 7
    assert [r["step"] for r in probe.records("0")] == [1, 4, 7]


def test_memory_is_bounded_and_history_thins_out():
    model = nn.Sequential(nn.Linear(3, 3))
    with Probe(model, budget=8) as probe:
        for _ in range(100):
            model(torch.randn(2, 3))
    steps = [r["step"] for r in probe.records("0")]
    assert len(steps) <= 9 and steps[0] == 1 and steps[-1] == 100
    assert steps == sorted(steps)


def test_detach_stops_recording_and_removes_hooks():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    probe = Probe(model).attach()
    model(torch.randn(2, 3))
    probe.detach()
    model(torch.randn(2, 3))
    assert probe.step == 1 and not probe.attached
    assert not model._forward_pre_hooks and not model[0]._forward_hooks


def test_layer_selection_by_type_name_pattern_and_predicate():
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), nn.Linear(3, 2))
    assert list(Probe(model, layers=nn.Linear).layers) == ["0.0", "1"]
    assert list(Probe(model, layers=["0.*"]).layers) == ["0.0", "0.1"]
    assert list(Probe(model, layers=lambda n, m: n == "1").layers) == ["1"]
    with pytest.raises(ValueError, match="no layer of Sequential matches"):
        Probe(model, layers=nn.Conv2d)
    with pytest.raises(ValueError, match="every must be a positive int"):
        Probe(model, every=0)


def test_exports(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with Probe(model) as probe:
        for _ in range(3):
            model(torch.randn(4, 3)).sum().backward()
    data = json.loads(probe.to_json(tmp_path / "p.json").read_text())
    assert data["order"] == ["0", "1"] and len(data["layers"]["0"]["records"]) == 3
    rows = list(csv.DictReader(probe.to_csv(tmp_path / "p.csv").open()))
    assert len(rows) == 6 and {"layer", "step", "std", "grad_norm"} <= set(rows[0])

    class Writer:  # the two methods a TensorBoard SummaryWriter offers that we use
        def __init__(self):
            self.scalars, self.histograms = [], []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def add_histogram_raw(self, tag, **kwargs):
            self.histograms.append((tag, kwargs["global_step"]))

    writer = Writer()
    probe.to_tensorboard(writer=writer)
    assert ("0/std", probe.records("0")[0]["std"], 1) in writer.scalars
    assert ("1/activation", 3) in writer.histograms


# --- findings ------------------------------------------------------------------------------

WIDTHS = [300, 280, 260, 240, 220, 200, 180, 160, 140, 120, 100]


def _deep(init, act=nn.Tanh, bias=0.0):
    torch.manual_seed(0)
    layers = []
    for fan_in, fan_out in zip(WIDTHS[:-1], WIDTHS[1:]):
        linear = nn.Linear(fan_in, fan_out)
        if init == "xavier":
            nl.init.xavier_normal_(linear.weight)
        elif init == "he":
            nl.init.he_normal_(linear.weight)
        else:
            nn.init.normal_(linear.weight, 0.0, init)
        nn.init.constant_(linear.bias, bias)
        layers += [linear, act()]
    return nn.Sequential(*layers)


def _kinds(model):
    with Probe(model) as probe:
        for _ in range(2):
            model.zero_grad()
            model(torch.randn(256, WIDTHS[0])).pow(2).mean().backward()
    return {f.kind for f in probe.findings()}, probe


def test_small_weights_tanh_collapses():
    # Its back-propagated gradients shrink toward the input, but the activations grow
    # toward the input just as much, so every layer's weights learn at the same relative
    # rate: collapse, not vanishing gradients (test_diagnostics_truth.py has both cases).
    kinds, probe = _kinds(_deep(0.01))
    assert "collapse" in kinds and "vanishing_gradients" not in kinds
    finding = next(f for f in probe.findings() if f.kind == "collapse")
    assert finding.layers == ["1", "19"] and "Xavier" in finding.suggestion
    assert "std" in finding.numbers and finding.numbers["std"]["19"] < 1e-2 * finding.numbers["std"]["1"]


def test_unit_weights_tanh_saturates():
    kinds, probe = _kinds(_deep(1.0))
    assert "saturation" in kinds
    finding = next(f for f in probe.findings() if f.kind == "saturation")
    assert all(v > 0.3 for v in finding.numbers["saturated"].values())


def test_relu_with_large_negative_bias_has_dead_units():
    kinds, probe = _kinds(_deep("he", nn.ReLU, bias=-5.0))
    assert "dead_units" in kinds
    assert "LeakyReLU" in next(f for f in probe.findings() if f.kind == "dead_units").suggestion


@pytest.mark.parametrize("init,act", [("xavier", nn.Tanh), ("he", nn.ReLU)])
def test_healthy_networks_raise_no_findings(init, act):
    kinds, _ = _kinds(_deep(init, act))
    assert kinds == set()


def test_nonfinite_and_drift_findings():
    model = nn.Sequential(nn.Linear(4, 4), nl.nn.BatchNorm1d(4), nn.ReLU())
    with Probe(model) as probe:
        x = torch.randn(64, 4) * 10 + 50  # far from the running statistics (0, 1)
        model(x)
        with pytest.warns(RuntimeWarning):
            model(torch.full((8, 4), float("nan"))).sum().backward()
    kinds = {f.kind for f in probe.findings()}
    assert "nonfinite" in kinds and "stat_drift" in kinds
    assert str(probe.findings()[0]).startswith("[")


def test_the_thresholds_type_is_what_diagnose_takes():
    """Probe.findings and Probe.report type their ``**thresholds`` by Thresholds: its keys are
    diagnose's keyword arguments, each optional, typed as its default is."""
    from normlab.diagnostics.findings import Thresholds, diagnose

    keywords = [p for p in inspect.signature(diagnose).parameters.values() if p.kind is p.KEYWORD_ONLY]
    assert typing.get_type_hints(Thresholds) == {p.name: type(p.default) for p in keywords}
    assert Thresholds.__required_keys__ == frozenset()


# --- report and plots ----------------------------------------------------------------------


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.images = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_report_is_self_contained_html(tmp_path):
    kinds, probe = _kinds(_deep(0.01))
    path = probe.report(tmp_path / "report.html")
    text = path.read_text()
    parser = _Collect()
    parser.feed(text)
    assert text.startswith("<!DOCTYPE html>") and "html" in parser.tags and "table" in parser.tags
    assert len(parser.images) == 3
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "collapse" in text and "Suggestion" in text
    assert "http://" not in text and "https://" not in text  # nothing to fetch


def test_plots_are_headless_figures(tmp_path):
    _, probe = _kinds(_deep("xavier"))
    for make in (nl.diagnostics.histogram_grid, nl.diagnostics.percentile_bands, nl.diagnostics.gradient_norms):
        fig = make(probe)
        path = nl.diagnostics.save_figure(fig, tmp_path / f"{make.__name__}.png")
        assert path.read_bytes()[:4] == b"\x89PNG"
    grid = nl.diagnostics.histogram_grid(probe, layers=probe.layer_names[1::2])
    assert len([ax for ax in grid.axes if ax.get_visible()]) == 10
    assert not math.isnan(probe.latest("std")["1"])


# --- reports and exports treat names as data ----------------------------------------------


def _probe_with_names(names, cls=nn.Linear):
    model = nn.Sequential()
    for name in names:
        model.add_module(name, cls(4, 4))
    with Probe(model) as probe:
        for _ in range(2):
            model(torch.randn(8, 4)).sum().backward()
    return probe


def test_report_escapes_a_class_name_that_is_markup(tmp_path):
    markup = "<img src=x onerror=alert(1)>"
    probe = _probe_with_names(["a"], cls=type(markup, (nn.Linear,), {}))
    text = probe.report(tmp_path / "report.html").read_text()
    parser = _Collect()
    parser.feed(text)
    assert markup not in text and html.escape(markup) in text
    assert all(src.startswith("data:image/png;base64,") for src in parser.images)  # no injected <img>


@pytest.mark.parametrize("name", ["$^$", "$x$", "a$b", "\\frac"])
def test_layer_names_are_drawn_literally_not_as_math_text(tmp_path, name):
    probe = _probe_with_names([name, "ok"])
    text = probe.report(tmp_path / "report.html").read_text()  # "$^$" used to crash matplotlib
    parser = _Collect()
    parser.feed(text)
    assert len(parser.images) == 3
    grid = nl.diagnostics.histogram_grid(probe)
    assert grid.axes[0].get_title().startswith(name + "\n")
    assert not grid.axes[0].title.get_parse_math()


def test_csv_export_neutralises_formula_cells(tmp_path):
    formulas = ["=cmd|' /C calc'!A0", "+SUM(1)", "-2+3", "@SUM(A1)", "\t=1", "\r=1"]
    probe = _probe_with_names(formulas + ["plain"], cls=type("=HYPERLINK(0)", (nn.Linear,), {}))
    with probe.to_csv(tmp_path / "p.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["layer"] for r in rows[::2]] == ["'" + f for f in formulas] + ["plain"]
    assert {r["type"] for r in rows} == {"'=HYPERLINK(0)"}
    numbers = [v for r in rows for k, v in r.items() if k not in ("layer", "type") and v]
    assert any(v.startswith("-") for v in numbers)  # negative numbers stay numbers
    [float(v) for v in numbers]  # every other cell is still a number, unprefixed


def test_read_time_statistics_of_many_records_match_torch_per_record():
    """A layer's records are summarized together (one sort of a records × sample matrix);
    each must equal torch's numbers for its own finite values, NaN/inf rows included."""
    from normlab.diagnostics.summaries import SampleIndex, capture_activation, summarize_records

    generator = torch.Generator().manual_seed(3)
    tensors = [torch.randn(50, 40, generator=generator) * (i + 1) for i in range(5)]
    tensors[1][0, :7] = math.nan
    tensors[3][2, 3] = math.inf
    tensors.append(torch.full((50, 40), math.nan))  # nothing finite
    records = [capture_activation(t, SampleIndex(4096)) for t in tensors]
    summarize_records(records, bins=10, hist_range=(-4.0, 4.0))
    for t, r in zip(tensors, records):
        finite = t[torch.isfinite(t)]
        assert r["nonfinite"] == int((~torch.isfinite(t)).sum())  # the sample is the whole tensor here
        if not finite.numel():
            assert math.isnan(r["std"]) and "hist" not in r
            continue
        expected = torch.quantile(finite.double(), torch.tensor([0.15, 0.5, 0.85], dtype=torch.float64))
        assert [r["p15"], r["p50"], r["p85"]] == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-6)
        assert r["mean"] == pytest.approx(finite.double().mean().item(), rel=1e-5, abs=1e-6)
        assert r["std"] == pytest.approx(finite.double().std(correction=0).item(), rel=1e-5)
        hist = torch.histc(finite.clamp(-4.0, 4.0), bins=10, min=-4.0, max=4.0) / finite.numel()
        assert r["hist"] == pytest.approx(hist.tolist(), abs=1e-6)
