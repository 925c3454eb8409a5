"""The main job's pieces: offline data, the pluggable-norm model, training, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import normlab as nl
from normlab.cli import main
from normlab.experiments import ConvNet1d, TrainConfig, load_digits, load_mnist1d, make_norm, train_classifier
from normlab.experiments.data import Dataset
from normlab.experiments.demo import DemoConfig, format_table, run_demo
from normlab.experiments.studies.regularization import conv_net

ROOT = Path(__file__).resolve().parents[2]


def test_mnist1d_is_generated_offline_with_the_published_split():
    data = load_mnist1d()
    assert data.x_train.shape == (4000, 1, 40) and data.x_test.shape == (1000, 1, 40)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.long
    assert data.num_classes == 10
    assert set(data.y_test.unique().tolist()) == set(range(10))


def test_digits_ship_with_scikit_learn():
    data = load_digits()
    assert data.x_train.shape[1] == 64 and len(data.y_train) + len(data.y_test) == 1797
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0


@pytest.mark.parametrize("kind", ["batch", "group", "layer", "instance", "none"])
def test_model_builds_with_every_norm(kind):
    model = ConvNet1d(kind)
    out = model(torch.randn(4, 1, 40))
    assert out.shape == (4, 10)
    norms = [m for m in model.modules() if nl.nn.is_norm_layer(m)]
    assert len(norms) == (0 if kind == "none" else 3)


def test_make_norm_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="norm kind must be one of"):
        make_norm("batchnorm", 8)


def test_training_learns_and_is_deterministic():
    data = load_mnist1d()
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        results.append(train_classifier(ConvNet1d("batch"), data, TrainConfig(batch_size=32, epochs=2, seed=3)))
    assert results[0].test_accuracy == results[1].test_accuracy
    assert results[0].test_accuracy > 0.5  # chance is 0.1
    assert results[0].steps == 2 * (4000 // 32)


def test_demo_runs_and_reports_every_cell():
    config = DemoConfig(epochs=1, batch_sizes=(32,), norms=("batch", "group"), jobs=1)
    rows = run_demo(config)
    assert {(r["norm"], r["batch_size"]) for r in rows} == {("batch", 32), ("group", 32)}
    table = format_table(rows, config)
    assert "BatchNorm" in table and "GroupNorm(8)" in table


def test_cli_demo_writes_json(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert (
        main(["demo", "--epochs", "1", "--batch-sizes", "32", "--norms", "group", "--jobs", "1", "--out", str(out)])
        == 0
    )
    payload = json.loads(out.read_text())
    assert payload["runs"][0]["norm"] == "group"
    assert "GroupNorm" in capsys.readouterr().out


def test_cli_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "normlab", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in result.stdout


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [readme[i + 1] for i, line in enumerate(readme) if line.startswith(("# 1. ", "# 2. "))]
    assert len(commands) == 2
    assert all(c.startswith("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0") for c in commands)
    assert commands[0].endswith("normlab study --quick")  # the main job is the quick study suite
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command 1" in ci and "readme_command 2" in ci


def test_testing_only_after_the_last_epoch_gives_the_same_run():
    """``test_every_epoch=False`` skips the earlier test passes, and changes nothing else: the
    weights, the running statistics and the final numbers are those of a run tested every epoch
    (BatchNorm with dropout, so eval mode and the random stream both matter)."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 40, generator=generator), torch.randint(0, 10, (96,), generator=generator)
    data = Dataset("random", x[:64], y[:64], x[64:], y[64:])
    runs = {}
    for every in (True, False):
        torch.manual_seed(0)
        model = conv_net("batch", 0.5)
        records: list[dict] = []
        result = train_classifier(
            model,
            data,
            TrainConfig(batch_size=16, epochs=3, seed=3),
            on_epoch=lambda epoch, record, records=records: records.append(dict(record)),
            test_every_epoch=every,
        )
        runs[every] = (result, records, model.state_dict())
    (tested, tested_records, tested_state), (last, last_records, last_state) = runs[True], runs[False]
    assert [("test_accuracy" in r) for r in tested_records] == [True, True, True]
    assert [("test_accuracy" in r) for r in last_records] == [False, False, True]
    assert last.test_accuracy == tested.test_accuracy and last.train_loss == tested.train_loss
    assert [r["train_loss"] for r in last_records] == [r["train_loss"] for r in tested_records]
    assert all(torch.equal(last_state[k], tested_state[k]) for k in tested_state)
