"""The studies at their smoke settings: they run, write what they promise, and — where the
outcome is robust even at this size — find what the papers found."""

from __future__ import annotations

import importlib
import json
import math
import pkgutil

import pytest
import torch

from normlab import surgery
from normlab.cli import main
from normlab.experiments import all_studies, get_study, run_study
from normlab.experiments.models import COLUMN_NORM_KINDS, MLP, NORM_KINDS, make_norm
from normlab.experiments.output import write_json
from normlab.experiments.report import render_report
from normlab.experiments.runner import parallel_map, worker_pool
from normlab.experiments.studies import STUDIES
from normlab.experiments.studies.depth import gradient_ratios
from normlab.experiments.studies.dropout_nets import conv_net
from normlab.experiments.studies.dropout_order import variance_shift
from normlab.experiments.studies.regularization import Config as RegularizationConfig
from normlab.experiments.studies.regularization import gains
from normlab.experiments.studies.weight_decay import product_pairs
from normlab.experiments.training import StepConfig, TrainConfig, train_classifier, train_steps

STUDY_NAMES = list(STUDIES)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Every study once at its smoke setting, in this process (jobs=1)."""
    root = tmp_path_factory.mktemp("smoke")
    results = {}
    for name in STUDY_NAMES:
        results[name] = (run_study(name, "smoke", root / name), root / name)
    return results


def test_registry_lists_every_study_module_once_with_three_settings():
    studies = all_studies()
    assert list(studies) == STUDY_NAMES and len(STUDY_NAMES) == 14
    package = importlib.import_module("normlab.experiments.studies")
    modules = [importlib.import_module(f"{package.__name__}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]
    defined = [m.STUDY for m in modules if hasattr(m, "STUDY")]
    assert sorted(s.name for s in defined) == sorted(studies)  # no study module left out of the registry
    assert all(studies[s.name] is s for s in defined)
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
    norms = ("batch", "group", *COLUMN_NORM_KINDS)
    assert {(r["norm"], r["batch_size"]) for r in rows} == {(n, b) for n in norms for b in (32, 4)}
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows)
    assert all("precise_accuracy" in r for r in rows if r["norm"] == "batch")
    gap = smoke["train-eval-gap"][0]["data"]["runs"]
    for r in gap:
        keys = {"eval_mode", "unfrozen_finetune"} | (
            {"train_mode", "precise_bn", "frozen_finetune"} if r["norm"] == "batch" else set()
        )
        assert keys <= set(r) and all(0 <= r[k] <= 1 for k in keys)


@pytest.mark.slow
def test_language_models_learn_and_qk_layernorm_bounds_the_logits(smoke):
    # norm-free: every norm (and none) learns something in 30 steps at the base rate.
    free = smoke["norm-free"][0]["data"]
    base = free["final_loss"]["LayerNorm"]["lrs"].index(get_study("norm-free").settings["smoke"].base_lr)
    assert all(cell["mean"][base] < free["initial_loss"][label] - 0.5 for label, cell in free["final_loss"].items())
    # qk-norm: without QK-layernorm the largest logit grows by orders of magnitude from the
    # lowest rate to the highest; with it, it stays within a few units.
    arms = smoke["qk-norm"][0]["data"]["by_arm"]
    assert arms["none"]["max_attention_logit"][-1] > 100 * arms["none"]["max_attention_logit"][0]
    assert arms["layer"]["max_attention_logit"][-1] < 10 < arms["none"]["max_attention_logit"][-1]


@pytest.mark.slow
def test_depth_ratios_vanish_with_xavier_and_not_with_he(smoke):
    rows = [r for r in smoke["depth"][0]["data"]["runs"] if not r["clipped"] and r["norm"] == "none"]
    deepest = max(r["depth"] for r in rows)
    ratio = {r["init"]: r["preactivation_grad_ratio"] for r in rows if r["depth"] == deepest}
    assert ratio["xavier"] < 0.1 and 0.3 < ratio["he"] < 3


@pytest.mark.slow
def test_regularization_bn_beats_no_norm_and_dropout_reaches_training(smoke):
    cells = {(c["norm"], c["dropout"], c["weight_decay"]): c for c in smoke["regularization"][0]["data"]["cells"]}
    assert len(cells) == 8  # {none, BN} × p {0, 0.5} × λ {0, large}
    assert cells[("batch", 0.0, 0.0)]["test"] > cells[("none", 0.0, 0.0)]["test"] + 5
    # dropout is on in training and off in eval: it costs training-set fit at p = 0.5
    assert cells[("batch", 0.5, 0.0)]["train"] < cells[("batch", 0.0, 0.0)]["train"]
    assert set(smoke["regularization"][0]["data"]["gains"]["cnn"]) == {"none", "batch"}


def test_regularization_gains_of_known_cells():
    config = RegularizationConfig(models=("cnn",), dropouts=(0.0, 0.5), weight_decays=(0.0, 1e-4, 5e-4))
    test = {
        (0.0, 0.0): 90.0,
        (0.0, 1e-4): 93.0,
        (0.0, 5e-4): 91.0,
        (0.5, 0.0): 80.0,
        (0.5, 1e-4): 92.0,
        (0.5, 5e-4): 85.0,
    }
    cells = {("cnn", "batch", p, wd): {"test": v} for (p, wd), v in test.items()}
    g = gains(config, cells, "cnn", "batch")
    assert g["best"] == {"dropout": 0.0, "weight_decay": 1e-4, "test": 93.0}
    assert g["dropout_gain"] == pytest.approx(92.0 - 93.0)
    assert g["l2_gain"] == pytest.approx(93.0 - 90.0)
    assert g["small_vs_large_l2"] == pytest.approx(93.0 - 91.0)


@pytest.mark.slow
def test_dropout_before_bn_shifts_its_variance_and_precise_bn_undoes_it(smoke):
    cells = {c["placement"]: c for c in smoke["dropout-order"][0]["data"]["cells"]}
    before, head, relu = cells["norm"], cells["head"], cells["relu"]
    # right before BN: test variance about q = 0.5 of the running one, as Li et al.'s formula says
    assert before["ratio"][0] < 0.8 and before["ratio"][0] == pytest.approx(before["predicted"][0], rel=0.15)
    assert max(before["shift"]) > max(relu["shift"]) > max(head["shift"])
    assert max(head["shift"]) < 1.2  # no BN below the only dropout: no shift
    assert max(before["precise_shift"]) < 1.2  # recomputed with dropout off


def test_variance_shift_of_dropout_right_before_batchnorm_is_the_keep_rate():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Dropout(0.5), make_norm("batch", 8))
    model[1].momentum = None  # cumulative: the running variance is the training variance
    model.train()
    with torch.no_grad():
        for _ in range(200):
            model(torch.randn(64, 8))
    (layer,) = variance_shift(model, torch.randn(4096, 8), keep=0.5)
    assert layer["ratio"] == pytest.approx(0.5, abs=0.05)  # zero-mean input: exactly q in expectation
    assert layer["predicted_ratio"] == pytest.approx(0.5, abs=0.05)
    assert layer["shift"] == pytest.approx(2.0, rel=0.1)
    assert model.training  # left as it was


def test_conv_net_places_dropout_where_asked():
    def kinds(net):
        return [type(m).__name__ for m in net]

    relu = kinds(conv_net("batch", 0.3, "relu"))
    assert relu[:4] == ["Conv1d", "BatchNorm1d", "ReLU", "Dropout"]
    assert kinds(conv_net("batch", 0.3, "norm"))[:4] == ["Conv1d", "Dropout", "BatchNorm1d", "ReLU"]
    head = kinds(conv_net("batch", 0.3, "head"))
    assert head.count("Dropout") == 1 and head[-2:] == ["Dropout", "Linear"]
    assert "Dropout" not in kinds(conv_net("batch", 0.0, "relu"))
    with pytest.raises(ValueError, match="placement must be one of"):
        conv_net("batch", 0.3, "input")


@pytest.mark.slow
def test_weight_decay_bounds_the_norm_of_scale_invariant_weights(smoke):
    runs = {(r["norm"], r["weight_decay"]): r for r in smoke["weight-decay"][0]["data"]["runs"]}
    free, decayed = runs[("batch", 0.0)], runs[("batch", 4e-3)]
    assert free["growth"] > 1.2 and free["growth"] > decayed["growth"]  # without L2, ‖w‖ grows
    assert free["effective_lr_change"] < decayed["effective_lr_change"] < 1.0
    # with L2 the angle per step is near its balance √(2ηλ/(1+μ)) (Wan et al., 2021)
    assert decayed["angular_update"] == pytest.approx(decayed["predicted_angular_update"], rel=0.3)
    for row in smoke["weight-decay"][0]["data"]["deep_runs"]:
        assert row["grad_norm"] and all(g > 0 for g in row["grad_norm"])


def test_product_pairs_sees_a_function_of_the_product_only():
    lrs, wds = [0.05, 0.1, 0.2], [1e-3, 2e-3, 4e-3]
    cells = {(lr, wd): 80 + 1e3 * lr * wd for lr in lrs for wd in wds}
    pairs = product_pairs(cells, lrs, wds)
    assert pairs["same product"] == pytest.approx(0.0, abs=1e-9)
    assert pairs["same η"] > 0 and pairs["same λ"] > 0
    assert product_pairs(cells, lrs, [1e-3, 3e-3, 9e-3]) is None  # ratios differ: no anti-diagonals


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
    assert type(make_norm("batch_renorm", 8, dims=2)).__name__ == "BatchRenorm2d"  # surgery's name for it
    assert set(NORM_KINDS) - {"none"} <= set(surgery.TARGETS)  # one vocabulary with convert_norms
    with pytest.raises(ValueError, match="norm kind must be one of"):
        make_norm("brn", 8)
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


def test_report_folds_figures_marked_folded():
    result = {
        "study": "s",
        "title": "S",
        "question": "?",
        "setting": "smoke",
        "seconds": 1.0,
        "figures": [
            {"file": "main.png", "caption": "main"},
            {"file": "a.png", "caption": "a", "folded": True},
            {"file": "b.png", "caption": "b", "folded": True},
        ],
    }
    page = render_report([result], setting="smoke", seconds=1.0)
    shown, folded = page.split("<details>")
    assert "s/main.png" in shown and "s/a.png" not in shown
    assert "2 more figures" in folded and "s/a.png" in folded and "s/b.png" in folded


def test_train_classifier_refuses_a_batch_larger_than_the_data():
    data = type("D", (), {})()
    data.x_train, data.y_train = torch.randn(8, 40), torch.randint(0, 10, (8,))
    data.x_test, data.y_test = data.x_train, data.y_train
    with pytest.raises(ValueError, match="larger than the 8 training samples"):
        train_classifier(MLP(40, [16], 10), data, TrainConfig(batch_size=16, epochs=1))


def test_report_escapes_text_and_shows_failures():
    results = [
        {
            "study": "depth",
            "title": "<b>Depth</b>",
            "question": "q & a",
            "setting": "smoke",
            "seconds": 1.0,
            "summary": ["x < y"],
            "tables": [{"title": "t", "columns": ["a"], "rows": [["<i>"]], "note": ""}],
            "figures": [{"file": "f.png", "caption": "c"}],
            "comparison": [{"what": "w", "published": "p", "ours": "o", "agrees": "partly", "why": "because"}],
        },
        {
            "study": "convergence",
            "title": "Conv",
            "question": "?",
            "setting": "smoke",
            "seconds": 0.5,
            "error": "ValueError: boom",
        },
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
    assert (
        main(
            [
                "study",
                "--smoke",
                "--only",
                "depth",
                "learning-rate",
                "--jobs",
                "1",
                "--seeds",
                "1",
                "--out",
                str(report_dir),
            ]
        )
        == 0
    )
    page = (report_dir / "index.html").read_text()
    assert 'id="depth"' in page and 'id="learning-rate"' in page and 'id="batch-size"' not in page
    report = json.loads((report_dir / "report.json").read_text())
    assert [s["study"] for s in report["studies"]] == ["depth", "learning-rate"]
    assert report["studies"][0]["config"]["seeds"] == [1]
    assert main(["run", "nonsense", "--smoke"]) == 2
    assert "no study named 'nonsense'" in capsys.readouterr().err


def _numbers(result):
    """A result without its timings (at any depth), as JSON has it: what must not depend on
    how the jobs were scheduled."""
    if isinstance(result, dict):
        return {k: _numbers(v) for k, v in result.items() if k not in ("seconds", "job_seconds")}
    if isinstance(result, (list, tuple)):
        return [_numbers(v) for v in result]
    return result


def test_a_suite_in_a_pool_measures_side_by_side_and_finds_the_same_numbers(smoke, tmp_path, monkeypatch):
    from normlab.experiments import suite as suite_module

    names = ["convergence", "depth", "learning-rate"]  # depth maps its jobs twice, one map after the other
    events: list[tuple[str, str]] = []
    measure, finish = suite_module.measure_study, suite_module.finish_study

    def measure_logged(name, *args, **kwargs):
        events.append(("measure", name))
        return measure(name, *args, **kwargs)

    def finish_logged(measured):
        events.append(("finish", measured.study.name))
        return finish(measured)

    monkeypatch.setattr(suite_module, "measure_study", measure_logged)
    monkeypatch.setattr(suite_module, "finish_study", finish_logged)
    _, results = suite_module.run_suite("smoke", tmp_path, only=names, jobs=2)
    assert [r["study"] for r in results] == names and not any(r.get("error") for r in results)
    # every study was being measured before the first one was summarised
    assert events.index(("finish", "convergence")) > max(events.index(("measure", n)) for n in names)
    assert [e for e in events if e[0] == "finish"] == [("finish", n) for n in names]
    for r in results:
        assert _numbers(r) == _numbers(smoke[r["study"]][0]), r["study"]
        assert r["job_seconds"] > 0 and r["seconds"] > 0
        assert json.loads((tmp_path / r["study"] / "result.json").read_text())["job_seconds"] == r["job_seconds"]


def test_a_suite_in_a_pool_reports_a_failed_study_and_an_interruption(tmp_path, monkeypatch):
    from normlab.experiments import suite as suite_module

    measure = suite_module.measure_study

    def failing(name, *args, **kwargs):
        if name == "learning-rate":
            raise ValueError("broken on purpose")
        return measure(name, *args, **kwargs)

    monkeypatch.setattr(suite_module, "measure_study", failing)
    _, results = suite_module.run_suite("smoke", tmp_path / "a", only=["learning-rate", "convergence"], jobs=2)
    assert results[0]["error"] == "ValueError: broken on purpose" and "broken on purpose" in results[0]["traceback"]
    assert results[1]["study"] == "convergence" and not results[1].get("error")

    def interrupted(name, *args, **kwargs):
        if name == "convergence":
            raise KeyboardInterrupt
        return measure(name, *args, **kwargs)

    monkeypatch.setattr(suite_module, "measure_study", interrupted)
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        suite_module.run_suite("smoke", out, only=["convergence", "depth"], jobs=2)
    report = json.loads((out / "report.json").read_text())
    assert report["state"] == "interrupted" and report["pending"] == ["convergence", "depth"]
    assert not (out / "depth" / "result.json").exists()  # measured or not, not passed off as finished


def test_job_clock_adds_up_the_jobs_of_its_own_thread_only():
    import threading

    from normlab.experiments.runner import job_clock

    def slow(i):
        import time

        time.sleep(0.05)
        return {"i": i}

    with job_clock() as outer:
        with job_clock() as inner:
            parallel_map(slow, [{"i": 0}, {"i": 1}])
        other = []
        thread = threading.Thread(target=lambda: other.append(parallel_map(slow, [{"i": 2}])))
        thread.start()
        thread.join()
    assert inner.jobs == 2 and outer.jobs == 2 and other == [[{"i": 2}]]
    assert 0.1 <= inner.seconds <= outer.seconds
