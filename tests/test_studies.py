"""The studies at their smoke settings: they run, write what they promise, and — where the
outcome is robust even at this size — find what the papers found."""

from __future__ import annotations

import json
import math

import pytest
import torch

from normlab.cli import main
from normlab.experiments import all_studies, get_study, run_study
from normlab.experiments.models import MLP, make_norm
from normlab.experiments.report import render_report
from normlab.experiments.runner import parallel_map, worker_pool, write_json
from normlab.experiments.studies.depth import gradient_ratios
from normlab.experiments.training import StepConfig, train_steps

STUDY_NAMES = ["init-depth", "batch-size", "convergence", "learning-rate", "dead-units", "train-eval-gap", "depth",
               "norm-placement"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Every study once at its smoke setting, in this process (jobs=1)."""
    root = tmp_path_factory.mktemp("smoke")
    results = {}
    for name in STUDY_NAMES:
        results[name] = (run_study(name, "smoke", root / name), root / name)
    return results


def test_registry_lists_every_study_with_three_settings():
    studies = all_studies()
    assert list(studies) == STUDY_NAMES
    for study in studies.values():
        assert set(study.settings) == {"smoke", "quick", "full"}
        assert study.title and study.question
    with pytest.raises(KeyError, match="the studies are"):
        get_study("batchsize")


def test_seeds_override_and_validation():
    study = get_study("convergence")
    assert study.config("quick", seeds=[3, 4]).seeds == (3, 4)
    with pytest.raises(ValueError, match="setting must be one of"):
        study.config("huge")
    with pytest.raises(ValueError, match="seeds must not be empty"):
        study.config("quick", seeds=[])


@pytest.mark.slow
@pytest.mark.parametrize("name", STUDY_NAMES)
def test_study_writes_json_and_every_figure(smoke, name):
    result, out = smoke[name]
    on_disk = json.loads((out / "result.json").read_text())  # strict JSON: no NaN anywhere
    assert on_disk["study"] == name and on_disk["setting"] == "smoke" and on_disk["seconds"] > 0
    assert result["figures"] and result["summary"] and result["tables"]
    for fig in result["figures"]:
        assert (out / fig["file"]).stat().st_size > 1000
    for table in result["tables"]:
        assert all(len(row) == len(table["columns"]) for row in table["rows"])
    for c in result["comparison"]:
        assert c["agrees"] in ("yes", "partly", "no") and c["published"] and c["ours"]


@pytest.mark.slow
def test_init_depth_finds_collapse_saturation_and_bn_unit_std(smoke):
    runs = smoke["init-depth"][0]["data"]["runs"]
    small = runs["tanh, N(0, 0.01²)"]["layers"][-1]["activation_std"]
    xavier = runs["tanh, Xavier"]["layers"][-1]["activation_std"]
    assert small < 1e-3 * xavier  # orders of magnitude below
    assert runs["tanh, N(0, 1)"]["layers"][-1]["saturated"] > 0.5  # mostly at ±1
    for name, run in runs.items():
        if name.endswith("+ BN"):
            assert all(0.9 < layer["preactivation_std"] < 1.1 for layer in run["layers"]), name
    relu = runs["ReLU, Xavier"]["layers"]
    assert relu[-1]["activation_std"] < 0.2 * relu[0]["activation_std"]  # ~0.71 per layer


@pytest.mark.slow
def test_convergence_bn_learns_faster_and_keeps_sigmoid_inputs_still(smoke):
    summary = smoke["convergence"][0]["data"]["summary"]
    assert summary["batch"]["final_accuracy"][0] > summary["none"]["final_accuracy"][0] + 0.05
    assert summary["batch"]["drift"][0] < summary["none"]["drift"][0]


@pytest.mark.slow
def test_learning_rate_bn_survives_30x(smoke):
    stats = smoke["learning-rate"][0]["data"]["by_multiplier"]
    at_30 = {norm: next(x for x in stats[norm] if x["multiplier"] == 30) for norm in ("none", "batch")}
    assert at_30["batch"]["failed"] == 0
    assert at_30["batch"]["mean_accuracy"] > at_30["none"]["mean_accuracy"]


@pytest.mark.slow
def test_dead_units_relu_dies_more_without_bn(smoke):
    cells = {(c["norm"], c["activation"]): c for c in smoke["dead-units"][0]["data"]["cells"]}
    assert cells[("none", "relu")]["dead"] > cells[("batch", "relu")]["dead"]


@pytest.mark.slow
def test_batch_size_and_gap_record_every_evaluation(smoke):
    rows = smoke["batch-size"][0]["data"]["runs"]
    assert {(r["norm"], r["batch_size"]) for r in rows} == {(n, b) for n in ("batch", "group") for b in (32, 4)}
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows)
    assert all("precise_accuracy" in r for r in rows if r["norm"] == "batch")
    gap = smoke["train-eval-gap"][0]["data"]["runs"]
    for r in gap:
        keys = {"eval_mode", "unfrozen_finetune"} | ({"train_mode", "precise_bn", "frozen_finetune"}
                                                     if r["norm"] == "batch" else set())
        assert keys <= set(r) and all(0 <= r[k] <= 1 for k in keys)


@pytest.mark.slow
def test_depth_ratios_vanish_with_xavier_and_not_with_he(smoke):
    rows = [r for r in smoke["depth"][0]["data"]["runs"] if not r["clipped"] and r["norm"] == "none"]
    deepest = max(r["depth"] for r in rows)
    ratio = {r["init"]: r["preactivation_grad_ratio"] for r in rows if r["depth"] == deepest}
    assert ratio["xavier"] < 0.1 and 0.3 < ratio["he"] < 3


def test_gradient_ratio_of_a_known_network():
    # Identity-initialized linear layers pass the gradient unchanged: the ratio is exactly 1.
    model = MLP(8, [8] * 5, 4, activation="relu", norm="none", init="he", seed=0)
    with torch.no_grad():
        for block in model.blocks:
            block.linear.weight.copy_(torch.eye(8))
            block.linear.bias.fill_(10.0)  # every unit on: ReLU is the identity here
    ratios = gradient_ratios(model, torch.randn(16, 8), torch.randint(0, 4, (16,)))
    assert ratios["preactivation_grad_ratio"] == pytest.approx(1.0, rel=1e-6)


def test_train_steps_stops_on_divergence_and_reports_it():
    data = type("D", (), {})()
    data.x_train = torch.randn(64, 1, 40) * 1e3
    data.y_train = torch.randint(0, 10, (64,))
    data.x_test, data.y_test = data.x_train[:8], data.y_train[:8]
    model = MLP(40, [16], 10, init="normal", init_std=1e3)
    result = train_steps(model, data, StepConfig(steps=50, batch_size=16, lr=1e6, check_every=10))
    assert result.diverged and result.steps < 50 and result.test_accuracy == 0.0
    assert result.history[-1]["diverged"] is True


def test_make_norm_renorm_and_mlp_validation():
    layer = make_norm("renorm", 8)
    assert type(layer).__name__ == "BatchRenorm1d"
    with pytest.raises(ValueError, match="MLP norm must be"):
        MLP(4, [4], norm="group")
    with pytest.raises(ValueError, match="activation must be one of"):
        MLP(4, [4], activation="swish")
    with pytest.raises(ValueError, match="init scheme must be one of"):
        MLP(4, [4], init="lecun")


def test_parallel_map_keeps_task_order_in_worker_processes():
    tasks = [{"i": i} for i in range(7)]
    with worker_pool(2):
        assert parallel_map(dict, tasks) == tasks
    assert parallel_map(dict, tasks) == tasks  # no pool: in this process
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        with worker_pool(0):
            pass


def test_json_is_strict_and_nonfinite_becomes_null(tmp_path):
    path = write_json(tmp_path / "r.json", {"a": math.nan, "b": [1.0, math.inf], "c": (2, 3)})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": [2, 3]}


def test_report_escapes_text_and_shows_failures():
    results = [
        {"study": "depth", "title": "<b>Depth</b>", "question": "q & a", "setting": "smoke", "seconds": 1.0,
         "summary": ["x < y"], "tables": [{"title": "t", "columns": ["a"], "rows": [["<i>"]], "note": ""}],
         "figures": [{"file": "f.png", "caption": "c"}],
         "comparison": [{"what": "w", "published": "p", "ours": "o", "agrees": "partly", "why": "because"}]},
        {"study": "convergence", "title": "Conv", "question": "?", "setting": "smoke", "seconds": 0.5,
         "error": "ValueError: boom"},
    ]
    page = render_report(results, setting="smoke", seconds=1.5)
    assert "&lt;b&gt;Depth&lt;/b&gt;" in page and "<b>Depth</b>" not in page
    assert "x &lt; y" in page and "&lt;i&gt;" in page
    assert 'class="partly"' in page and "depth/f.png" in page
    assert "This study failed: ValueError: boom" in page
    assert "1 partly" in page


@pytest.mark.slow
def test_cli_list_run_and_study(tmp_path, capsys):
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in STUDY_NAMES)
    out = tmp_path / "depth"
    assert main(["run", "depth", "--smoke", "--jobs", "1", "--out", str(out)]) == 0
    assert json.loads((out / "result.json").read_text())["study"] == "depth"
    assert "wrote" in capsys.readouterr().out
    report_dir = tmp_path / "report"
    assert main(["study", "--smoke", "--only", "depth", "learning-rate", "--jobs", "1",
                 "--seeds", "1", "--out", str(report_dir)]) == 0
    page = (report_dir / "index.html").read_text()
    assert 'id="depth"' in page and 'id="learning-rate"' in page and 'id="batch-size"' not in page
    report = json.loads((report_dir / "report.json").read_text())
    assert [s["study"] for s in report["studies"]] == ["depth", "learning-rate"]
    assert report["studies"][0]["config"]["seeds"] == [1]
    assert main(["run", "nonsense", "--smoke"]) == 2
    assert "no study named 'nonsense'" in capsys.readouterr().err
