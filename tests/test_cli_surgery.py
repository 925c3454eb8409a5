"""normlab surgery fold|freeze|convert|precise: files in, files out, clear errors, and
nothing written when anything goes wrong."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from normlab.cli import main
from normlab.experiments.models import ConvNet1d
from normlab.surgery import fold_batchnorm

FACTORY = "normlab.experiments.models:ConvNet1d"


def no_norm_model():  # importable factory for the "nothing to do" case
    return nn.Sequential(nn.Linear(3, 3))


@pytest.fixture()
def weights(tmp_path):
    torch.manual_seed(0)
    model = ConvNet1d("batch")
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 1, 40))
    path = tmp_path / "in.pt"
    torch.save(model.state_dict(), path)
    return path, model


def _run(*argv):
    return main(["surgery", *map(str, argv)])


def test_fold_writes_a_reloadable_state_dict_and_a_report(tmp_path, weights):
    path, model = weights
    out = tmp_path / "folded.pt"
    assert _run("fold", "--model", FACTORY, "--weights", path, "--out", out, "--input-shape", "2,1,40") == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert len(report["changes"]) == 3 and report["max_abs_diff"] < 1e-5
    reloaded = fold_batchnorm(ConvNet1d("batch")).model
    reloaded.load_state_dict(torch.load(out, weights_only=True))
    x = torch.randn(4, 1, 40)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("argv", [
    ("freeze",), ("freeze", "--no-affine"), ("convert", "--to", "group"),
    ("convert", "--to", "frozen"), ("precise", "--data", "mnist1d", "--num-batches", "5"),
])
def test_other_operations(tmp_path, weights, argv):
    path, _ = weights
    out = tmp_path / "out.pt"
    assert _run(*argv, "--model", FACTORY, "--weights", path, "--out", out) == 0
    state = torch.load(out, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert json.loads(out.with_suffix(".json").read_text())["changes"]


def _fails(tmp_path, capsys, *argv, message):
    out = tmp_path / "never.pt"
    assert _run(*argv, "--out", out) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not list(tmp_path.glob(".never*"))  # no temporary files left behind either


def test_errors_write_nothing(tmp_path, weights, capsys):
    path, model = weights
    _fails(tmp_path, capsys, "fold", "--model", "no_such_pkg.models:net", message="cannot import 'no_such_pkg.models'")
    _fails(tmp_path, capsys, "fold", "--model", "normlab.experiments.models:Missing", message="has no attribute 'Missing'")
    _fails(tmp_path, capsys, "fold", "--model", "normlab.experiments.models", message="must look like package.module:name")
    _fails(tmp_path, capsys, "fold", "--model", FACTORY, "--weights", tmp_path / "absent.pt", message="no such file")
    _fails(tmp_path, capsys, "fold", "--model", "normlab.experiments.models:ResNet18", "--weights", path,
           message="do not match --model")
    pickled = tmp_path / "pickled.pt"
    torch.save(model, pickled)  # a whole pickled module: refused, never unpickled
    _fails(tmp_path, capsys, "fold", "--model", FACTORY, "--weights", pickled, message="not a weights-only checkpoint")
    _fails(tmp_path, capsys, "fold", "--model", "test_cli_surgery:no_norm_model", message="changed nothing")
    _fails(tmp_path, capsys, "fold", "--model", FACTORY, "--input-shape", "2,x", message="--input-shape")
    _fails(tmp_path, capsys, "precise", "--model", FACTORY, "--data", "nope.data:batches",
           message="cannot import 'nope.data'")
