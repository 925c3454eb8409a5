"""normlab surgery fold|freeze|convert|precise: files in, files out, clear errors, and
nothing written when anything goes wrong."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from normlab.cli import main
from normlab.cli.common import CommandError, atomic_write_files
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


@pytest.mark.parametrize(
    "argv",
    [
        ("freeze",),
        ("freeze", "--no-affine"),
        ("convert", "--to", "group"),
        ("convert", "--to", "frozen"),
        ("precise", "--data", "mnist1d", "--num-batches", "5"),
    ],
)
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
    _fails(
        tmp_path, capsys, "fold", "--model", "normlab.experiments.models:Missing", message="has no attribute 'Missing'"
    )
    _fails(
        tmp_path, capsys, "fold", "--model", "normlab.experiments.models", message="must look like package.module:name"
    )
    _fails(tmp_path, capsys, "fold", "--model", FACTORY, "--weights", tmp_path / "absent.pt", message="no such file")
    _fails(
        tmp_path,
        capsys,
        "fold",
        "--model",
        "normlab.experiments.models:ResNet18",
        "--weights",
        path,
        message="do not match --model",
    )
    pickled = tmp_path / "pickled.pt"
    torch.save(model, pickled)  # a whole pickled module: refused, never unpickled
    _fails(tmp_path, capsys, "fold", "--model", FACTORY, "--weights", pickled, message="not a weights-only checkpoint")
    _fails(tmp_path, capsys, "fold", "--model", "test_cli_surgery:no_norm_model", message="changed nothing")
    _fails(tmp_path, capsys, "fold", "--model", FACTORY, "--input-shape", "2,x", message="--input-shape")
    _fails(
        tmp_path,
        capsys,
        "precise",
        "--model",
        FACTORY,
        "--data",
        "nope.data:batches",
        message="cannot import 'nope.data'",
    )


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    return err


def test_out_named_like_its_report_is_refused(tmp_path, weights, capsys):
    path, _ = weights
    out = tmp_path / "X.json"
    assert _run("freeze", "--model", FACTORY, "--weights", path, "--out", out) == 2
    assert "is where the report goes" in _one_line_error(capsys)
    assert not out.exists()


def test_report_never_overwrites_the_input_weights(tmp_path, weights, capsys):
    path, _ = weights
    as_json = tmp_path / "w.json"
    as_json.write_bytes(path.read_bytes())
    assert _run("freeze", "--model", FACTORY, "--weights", as_json, "--out", tmp_path / "w.pt") == 2
    assert "would overwrite --weights" in _one_line_error(capsys)
    assert as_json.read_bytes() == path.read_bytes() and not (tmp_path / "w.pt").exists()


@pytest.mark.parametrize(
    "case",
    ["parent is a file", "out is a folder", "report is a folder", "folder cannot be created", "folder is read-only"],
)
def test_output_path_errors_are_one_line_and_write_nothing(tmp_path, weights, capsys, case):
    path, _ = weights
    out = tmp_path / "result.pt"
    if case == "parent is a file":
        (tmp_path / "file").write_text("")
        out, message = tmp_path / "file" / "result.pt", "is a file, not a folder"
    elif case == "out is a folder":
        out.mkdir()
        message = "is a folder; give a file name"
    elif case == "report is a folder":
        # Before the paths were checked first, the checkpoint was written, then the report failed.
        out.with_suffix(".json").mkdir()
        message = "is a folder"
    elif case == "folder cannot be created":
        out, message = Path("/proc/normlab-no-such-folder/result.pt"), "cannot write"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        out, message = locked / "result.pt", "no permission to write"
    assert _run("freeze", "--model", FACTORY, "--weights", path, "--out", out) == 2
    assert message in _one_line_error(capsys)
    if case != "out is a folder":
        assert not out.exists()
    assert not (out.is_file() or out.with_suffix(".json").is_file())
    assert not list(tmp_path.rglob(".*.tmp"))


def test_empty_weights_file_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    _fails(tmp_path, capsys, "fold", "--model", FACTORY, "--weights", empty, message="is empty (0 bytes)")


def test_pickled_checkpoint_refusal_names_what_was_blocked_and_never_suggests_unsafe_loading(tmp_path, weights, capsys):
    _, model = weights
    pickled = tmp_path / "pickled.pt"
    torch.save(model, pickled)
    assert _run("fold", "--model", FACTORY, "--weights", pickled, "--out", tmp_path / "o.pt") == 2
    err = _one_line_error(capsys)
    assert "pickled normlab.experiments.models.ConvNet1d" in err and "state_dict" in err
    assert "weights_only" not in err and "\x1b" not in err


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_written_files_follow_the_umask(tmp_path, weights, umask):
    path, _ = weights
    out = tmp_path / "frozen.pt"
    previous = os.umask(umask)
    try:
        assert _run("freeze", "--model", FACTORY, "--weights", path, "--out", out) == 0
    finally:
        os.umask(previous)
    for file in (out, out.with_suffix(".json")):
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize(
    "argv, message",
    [
        (("precise", "--data", "mnist1d", "--batch-size", "0"), "argument --batch-size: must be a positive integer"),
        (("precise", "--data", "mnist1d", "--num-batches", "-1"), "argument --num-batches: must be a positive integer"),
        (("convert", "--to", "group", "--groups", "x"), "argument --groups: must be a positive integer"),
        (("convert", "--to", "group", "--max-groups", "0"), "argument --max-groups: must be a positive integer"),
    ],
)
def test_bad_numbers_are_usage_errors(tmp_path, weights, capsys, argv, message):
    path, _ = weights
    with pytest.raises(SystemExit) as exit_:
        _run(*argv, "--model", FACTORY, "--weights", path, "--out", tmp_path / "o.pt")
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("o.*"))


def _write_ok(text):
    return lambda handle: handle.write(text.encode())


def _write_fails(handle):
    handle.write(b"half")
    raise OSError(28, "No space left on device")


def test_atomic_write_files_writes_all_or_nothing(tmp_path):
    first, second = tmp_path / "sub" / "a.pt", tmp_path / "sub" / "a.json"
    with pytest.raises(CommandError, match="No space left"):
        atomic_write_files({first: _write_ok("new"), second: _write_fails})
    assert not (tmp_path / "sub").exists()  # nor the folder made for them
    first.parent.mkdir()
    first.write_text("old")
    with pytest.raises(CommandError, match="No space left"):
        atomic_write_files({first: _write_ok("new"), second: _write_fails})
    assert first.read_text() == "old" and not second.exists()
    second.mkdir()  # the rename of the second file fails after the first was renamed
    with pytest.raises(CommandError, match="cannot write"):
        atomic_write_files({first: _write_ok("new"), second: _write_ok("{}")})
    assert first.read_text() == "old" and second.is_dir()
    assert sorted(p.name for p in first.parent.iterdir()) == ["a.json", "a.pt"]
    second.rmdir()
    atomic_write_files({first: _write_ok("new"), second: _write_ok("{}")})
    assert first.read_text() == "new" and second.read_text() == "{}"


# --- issue 26 -------------------------------------------------------------------------------------


def failing_loader():  # importable --data factory: one batch, then the disk goes away
    def batches():
        yield torch.randn(4, 1, 40)
        raise OSError(5, "Input/output error")

    return batches()


def test_a_loader_that_fails_mid_iteration_is_one_line_and_exit_2(tmp_path, weights, capsys):
    path, _ = weights
    argv = ("precise", "--model", FACTORY, "--weights", path, "--data", "test_cli_surgery:failing_loader")
    assert _run(*argv, "--out", tmp_path / "o.pt") == 2
    err = _one_line_error(capsys)
    assert "OSError" in err and "Input/output error" in err
    assert not list(tmp_path.glob("o.*"))


@pytest.mark.parametrize("no_affine", [False, True])
def test_freeze_says_what_the_file_holds_and_how_to_rebuild_the_freeze(tmp_path, weights, capsys, no_affine):
    path, model = weights
    out = tmp_path / "frozen.pt"
    extra = ("--no-affine",) if no_affine else ()
    assert _run("freeze", "--model", FACTORY, "--weights", path, "--out", out, *extra) == 0
    printed = capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())  # the same tensors
    report = json.loads(out.with_suffix(".json").read_text())
    reload = report["reload"]
    assert "same tensors" in printed and reload in printed
    # The recipe the report gives rebuilds the freeze from the factory and the file.
    from normlab import surgery

    assert reload == f"model = normlab.surgery.freeze_norms(factory(), affine={not no_affine}).model"
    rebuilt = surgery.freeze_norms(ConvNet1d("batch"), affine=not no_affine).model
    rebuilt.load_state_dict(saved)
    frozen = [m for m in rebuilt.modules() if getattr(m, "frozen", False)]
    assert len(frozen) == len(report["changes"]) > 0
    assert all(m.weight.requires_grad == no_affine for m in frozen)


def test_an_unknown_option_after_an_operation_shows_that_operation_s_usage(tmp_path, weights, capsys):
    path, _ = weights
    with pytest.raises(SystemExit) as exit_:
        _run("freeze", "--model", FACTORY, "--weights", path, "--out", tmp_path / "o.pt", "--bogus")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: normlab surgery freeze" in err and "unrecognized arguments: --bogus" in err


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda v: v.to("meta"), "on the meta device"),
        (lambda v: v.to_sparse() if v.dim() > 1 else v, "sparse"),
        (lambda v: v.to(torch.complex64) if v.is_floating_point() else v, "complex64"),
        (lambda v: v.long() if v.is_floating_point() else v, "int64"),
    ],
    ids=["meta", "sparse", "complex", "integer"],
)
def test_weights_the_model_cannot_take_are_one_line_and_exit_2(tmp_path, weights, capsys, tamper, message):
    """Tensors of the right names and shapes that the model's cannot hold: meta and sparse ones
    raised a RuntimeError traceback (exit 1); complex ones lost their imaginary part with only
    torch's warning, integer ones were cast into the float weights: both wrote a checkpoint."""
    path, _ = weights
    state = torch.load(path, weights_only=True)
    bad = tmp_path / "bad.pt"
    torch.save({k: tamper(v) for k, v in state.items()}, bad)
    out = tmp_path / "out.pt"
    assert _run("freeze", "--model", FACTORY, "--weights", bad, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_weights_that_are_not_a_regular_file(tmp_path, capsys):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path):
        _fails(tmp_path, capsys, "freeze", "--model", FACTORY, "--weights", path, message="is not a regular file")
