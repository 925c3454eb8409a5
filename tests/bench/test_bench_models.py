"""``normlab bench models``: every row runs, compares the same computation, and says so.

Tiny shapes and one repetition; no timing is asserted. What is asserted does not depend on
the machine: the rows and fields are there, the normlab side really holds normlab layers,
and a normlab model that computes something else is reported as disagreeing.
"""

import json
import math

import pytest
import torch

from normlab import nn as nln
from normlab.bench import models as bench_models
from normlab.bench.models import MODEL_KEYS, cases, run_model_case, smoke_config
from normlab.cli import main
from normlab.surgery import from_torch

ROW_FIELDS = {
    "model",
    "name",
    "layout",
    "mode",
    "input",
    "compiled",
    "threads",
    "device",
    "torch_ms",
    "normlab_ms",
    "ratio",
    "repeats",
    "calls_per_sample",
    "first_call_s_torch",
    "first_call_s_normlab",
    "output_rel_diff",
    "state_rel_diff",
    "worst_state",
    "max_rel_diff",
    "agrees",
    "normlab_layers",
    "graphs_torch",
    "graphs_normlab",
    "paths",
    "row_s",
}


def _run(argv, tmp_path, capsys):
    out = tmp_path / "models.json"
    code = main(["bench", "models", "--smoke", "--threads", "1", *argv, "--out", str(out)])
    captured = capsys.readouterr()
    return code, json.loads(out.read_text()), captured


def test_cli_runs_every_eager_row_and_writes_them(tmp_path, capsys):
    code, result, captured = _run(["--no-compile", "--markdown"], tmp_path, capsys)
    assert code == 0, captured.err
    assert result["benchmark"] == "models" and result["device"] == "cpu"
    rows = result["rows"]
    assert [(r["model"], r["mode"]) for r in rows] == [(k, m) for k in MODEL_KEYS for m in ("train", "eval")]
    for r in rows:
        assert set(r) == ROW_FIELDS, set(r) ^ ROW_FIELDS
        assert r["agrees"] and r["max_rel_diff"] <= bench_models.TOLERANCE, r
        assert r["compiled"] is False and r["threads"] == 1 and r["repeats"] == 1
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("torch_ms", "normlab_ms", "ratio"))
        # the normlab side holds normlab layers, and its norm calls went through normlab's dispatch
        assert r["normlab_layers"] > 0 and sum(r["paths"].values()) > 0, r
        assert r["input"].startswith("1x") == (r["mode"] == "eval")
    by_key = {(r["model"], r["mode"]): r for r in rows}
    # stem and the first norm of each of the 4 blocks are BN → ReLU pairs, fused
    assert by_key["cnn-bnact", "train"]["normlab_layers"] == 5
    assert by_key["cnn-bn", "train"]["normlab_layers"] == 10
    assert result["summary"]["rows"] == 14 and result["summary"]["agree"] == 14
    assert result["config"]["compiled"] == [False]
    for case in cases(smoke_config()):
        assert case.model in captured.out
    assert "14/14" in captured.out
    markdown = [line for line in captured.out.splitlines() if line.startswith("| ")]
    assert len(markdown) == 1 + 14 and markdown[0].endswith("| eager, 1 thr | agree |")
    assert all(line.endswith("| 1/1 |") for line in markdown[1:])


@pytest.mark.slow
def test_cli_compiled_row_agrees(tmp_path, capsys):
    code, result, captured = _run(["--models", "vit-rms", "--modes", "eval"], tmp_path, capsys)
    assert code == 0, captured.err
    eager, compiled = result["rows"]
    assert (eager["compiled"], compiled["compiled"]) == (False, True)
    assert compiled["agrees"] and compiled["normlab_layers"] > 0
    assert eager["graphs_normlab"] is None
    # really compiled, and normlab's layers inside the graph, not breaking it
    (graphs, breaks), (torch_graphs, torch_breaks) = compiled["graphs_normlab"], compiled["graphs_torch"]
    assert graphs >= 1 and torch_graphs >= 1 and breaks == torch_breaks == 0, compiled
    assert "compiled" in captured.out


def _disagreeing_from_torch(**changes):
    """from_torch, then the first normlab layer changed: a normlab side that computes
    something else than the torch.nn model."""

    def convert(model):
        result = from_torch(model)
        first = next(m for m in result.model.modules() if isinstance(m, nln.NORM_LAYERS))
        for name, value in changes.items():
            setattr(first, name, value)
        return result

    return convert


def test_cli_reports_models_that_disagree(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_models, "from_torch", _disagreeing_from_torch(eps=1.0))
    code, result, captured = _run(["--no-compile", "--models", "cnn-bn", "mlp-bn1d"], tmp_path, capsys)
    assert code == 1
    assert [r["agrees"] for r in result["rows"]] == [False] * 4
    assert all(r["max_rel_diff"] > 1e-3 for r in result["rows"])
    assert "FAIL" in captured.out and "disagree in cnn-bn train eager 1 thr" in captured.err
    assert result["summary"]["agree"] == 0


def test_a_wrong_running_statistics_update_is_caught_in_training(monkeypatch):
    # A momentum of 0.5 instead of 0.1 leaves the training outputs as they were (they use
    # the batch statistics) but not the running statistics the step leaves behind.
    monkeypatch.setattr(bench_models, "from_torch", _disagreeing_from_torch(momentum=0.5))
    case = next(c for c in cases(smoke_config()) if c.key == "cnn-bn")
    row = run_model_case(case, "train", False, 1, smoke_config())
    assert row["output_rel_diff"] <= bench_models.TOLERANCE
    assert row["state_rel_diff"] > 1e-2 and not row["agrees"]
    assert row["worst_state"].endswith("running_mean") or row["worst_state"].endswith("running_var")


def test_a_conversion_that_swaps_nothing_is_refused(monkeypatch):
    monkeypatch.setattr(bench_models, "from_torch", lambda model: type(from_torch(model))(model, None))
    case = next(c for c in cases(smoke_config()) if c.key == "vit-ln")
    with pytest.raises(RuntimeError, match="would time torch.nn twice"):
        run_model_case(case, "eval", False, 1, smoke_config())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where there is no GPU")
@pytest.mark.parametrize("benchmark", ["models", "layers"])
def test_cuda_is_refused_clearly_without_a_gpu(capsys, benchmark):
    assert main(["bench", benchmark, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "sees no CUDA device" in err and "--device cpu" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "resnet50"], "argument --models: invalid choice"),
        (["--threads", "0"], "argument --threads: must be a positive integer"),
        (["--quick", "--smoke"], "not allowed with argument"),
    ],
)
def test_bad_arguments_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "models", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_device_option_is_refused_before_any_work(capsys):
    assert main(["bench", "models", "--device", "tpu"]) == 2
    assert "device must be 'cpu' or 'cuda'" in capsys.readouterr().err
