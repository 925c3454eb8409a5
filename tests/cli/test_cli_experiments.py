"""normlab run / study / demo: usage errors in one line, prompt and complete stops on SIGINT and
SIGTERM (no process left behind), and reports that never pass stale or partial results
off as a finished run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import normlab.experiments.registry as registry_module
import normlab.experiments.suite as suite_module
from normlab.cli import main
from normlab.experiments.report import render_report
from normlab.experiments.suite import run_suite

# --- usage and path errors -----------------------------------------------------------------


@pytest.mark.parametrize("command", [["run", "depth"], ["study", "--only", "depth"]])
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--jobs", "0"], "argument --jobs: must be a positive integer"),
        (["--jobs", "-3"], "argument --jobs: must be a positive integer"),
        (["--seeds", "1e20"], "argument --seeds: seeds are integers from 0 to 4294967295"),
        (["--seeds", "0", str(10**20)], "argument --seeds: seeds are integers from 0 to 4294967295"),
        (["--seeds", "-1"], "argument --seeds: seeds are integers from 0 to 4294967295"),
        (["--seeds", "3", "3"], "argument --seeds: seed 3 given more than once"),
        (["--seeds", "1", "2", "1", "2"], "argument --seeds: seed 1, 2 given more than once"),
    ],
)
def test_bad_numbers_are_usage_errors(tmp_path, capsys, command, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--smoke", "--out", str(tmp_path / "out"), *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["run", "depth"], ["study", "--only", "depth"]])
@pytest.mark.parametrize("case", ["out is a file", "parent is a file", "cannot be created", "read-only"])
def test_output_folder_errors_are_one_line(tmp_path, capsys, command, case):
    (tmp_path / "file").write_text("keep")
    if case == "out is a file":
        out, message = tmp_path / "file", "is a file; give a folder"
    elif case == "parent is a file":
        out, message = tmp_path / "file" / "sub", "is a file, not a folder"
    elif case == "cannot be created":
        out, message = Path("/proc/normlab-no-such-folder/out"), "cannot create the folder"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "locked").mkdir(mode=0o555)
        out, message = tmp_path / "locked" / "out", "no permission to write"
    assert main([*command, "--smoke", "--jobs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and "Traceback" not in err
    assert (tmp_path / "file").read_text() == "keep"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--jobs", "0"], "argument --jobs: must be a positive integer"),
        (["demo", "--batch-sizes", "32", "0"], "argument --batch-sizes: must be a positive integer"),
        (["sync-demo", "--seed", "-1"], "argument --seed: seeds are integers"),
        (["bench", "memory", "--threads", "0"], "argument --threads: must be a positive integer"),
    ],
)
def test_other_commands_reject_bad_numbers_as_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["demo"], ["sync-demo"], ["bench", "fold"], ["bench", "memory"]])
def test_other_commands_check_out_before_running(tmp_path, capsys, argv):
    # A folder where a file is expected: refused at once, not after minutes of work.
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr()
    assert "is a folder; give a file name" in err.err and err.out == ""


# --- reports: stale, partial and untrusted values -----------------------------------------


def _fake_result(name: str, agrees: str = "yes") -> dict:
    return {
        "study": name,
        "title": name.title(),
        "question": "?",
        "setting": "smoke",
        "seconds": 0.1,
        "summary": [f"{name} ran"],
        "tables": [],
        "figures": [],
        "comparison": [{"what": "w", "published": "p", "ours": "o", "agrees": agrees, "why": ""}],
    }


def _report(out: Path) -> tuple[dict, str]:
    return json.loads((out / "report.json").read_text()), (out / "index.html").read_text()


def test_rerun_replaces_a_stale_report_and_marks_an_interrupted_one(tmp_path, monkeypatch):
    out = tmp_path / "suite"
    for name in ("depth", "convergence"):
        (out / name).mkdir(parents=True)
        (out / name / "result.json").write_text('{"stale": true}')
    (out / "index.html").write_text("<p>STALE REPORT</p>")
    (out / "report.json").write_text('{"stale": true}')
    seen = []

    def fake_run_study(name, setting, out_dir, seeds=None):
        state, page = _report(out)
        # While a study runs, the report on disk says so, and the old one is gone.
        seen.append((name, state["state"], "STALE" in page, (out_dir / "result.json").exists()))
        if name == "convergence":
            raise KeyboardInterrupt
        return _fake_result(name)

    monkeypatch.setattr(suite_module, "run_study", fake_run_study)
    with pytest.raises(KeyboardInterrupt):
        run_suite("smoke", out, only=["depth", "convergence", "learning-rate"], jobs=1)
    assert seen == [("depth", "running", False, False), ("convergence", "running", False, False)]
    state, page = _report(out)
    assert state["state"] == "interrupted" and state["reason"] == "Ctrl-C"
    assert [r["study"] for r in state["studies"]] == ["depth"]
    assert state["pending"] == ["convergence", "learning-rate"]
    assert "Interrupted (Ctrl-C) after 1 of 3 studies: this report is partial" in page
    assert "convergence — not finished" in page and "STALE" not in page
    assert not (out / "convergence" / "result.json").exists()  # a stale result never sits beside new ones

    monkeypatch.setattr(suite_module, "run_study", lambda name, *a, **k: _fake_result(name))
    run_suite("smoke", out, only=["depth", "convergence"], jobs=1)
    state, page = _report(out)
    assert state["state"] == "complete" and state["pending"] == []
    assert "this report is partial" not in page and "not finished" not in page


def test_cli_marks_an_interrupted_study_and_exits_130(tmp_path, monkeypatch, capsys):
    out = tmp_path / "one"
    out.mkdir()
    (out / "result.json").write_text('{"stale": true}')

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(registry_module, "run_study", interrupted)
    assert main(["run", "depth", "--smoke", "--jobs", "1", "--out", str(out)]) == 130
    assert not (out / "result.json").exists()
    err = capsys.readouterr().err
    assert "has no result.json" in err and "interrupted (Ctrl-C)" in err

    monkeypatch.setattr(suite_module, "run_study", interrupted)
    assert main(["study", "--smoke", "--only", "depth", "--jobs", "1", "--out", str(out)]) == 130
    assert _report(out)[0]["state"] == "interrupted"
    assert "marked interrupted" in capsys.readouterr().err


def test_study_report_never_writes_an_unknown_verdict_into_an_attribute():
    evil = '" onmouseover="alert(1)'
    page = render_report([_fake_result("depth", agrees=evil)], setting="smoke", seconds=1.0)
    assert 'onmouseover="alert(1)' not in page
    assert "&quot; onmouseover=&quot;alert(1)" in page  # shown as text in its cell
    page = render_report([_fake_result("depth", agrees="partly")], setting="smoke", seconds=1.0)
    assert '<tr class="partly">' in page


# --- signals -------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited; only its parent must reap it


def _workers(pid: int) -> list[int]:
    found = []
    for child in _descendants(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            pass
    return found


def _ignores_sigint(pid: int) -> bool:
    """Whether ``pid`` has run the worker initializer (workers ignore SIGINT from then on)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
    return bool(ignored & (1 << (signal.SIGINT - 1)))


# A shell without job control starts background jobs with SIGINT ignored, and a child
# inherits that; a terminal's Ctrl-C reaches a process that handles it, so the command
# runs with Python's usual SIGINT handler whatever this test runner inherited.
_NORMLAB_WITH_SIGINT = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'normlab'; runpy.run_module('normlab', run_name='__main__')"
)


def _start_normlab(*args: str, capture: bool = True) -> subprocess.Popen:
    """``normlab *args`` in a session of its own (so a signal can reach its whole process
    group), on the composed backend: no kernel build runs in a worker about to be stopped."""
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-c", _NORMLAB_WITH_SIGINT, *args],
        env={**os.environ, "NORMLAB_BACKEND": "composed"},
        stdout=out,
        stderr=out,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
def test_workers_ignore_sigint_from_their_first_instruction(tmp_path):
    """A worker imports torch for seconds before its initializer runs; a Ctrl-C then used to
    print its KeyboardInterrupt traceback. Workers now start with SIGINT ignored."""
    proc = _start_normlab(
        "study", "--smoke", "--only", "train-eval-gap", "--jobs", "2", "--out", str(tmp_path / "study"), capture=False
    )
    try:
        deadline = time.monotonic() + 120
        while not _workers(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        workers = _workers(proc.pid)
        assert workers, "the study did not start its workers"
        assert all(_ignores_sigint(p) for p in workers)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
@pytest.mark.parametrize(
    "signum, code",
    [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGKILL, -9)],
    ids=["SIGTERM", "SIGINT", "SIGKILL"],
)
def test_a_signal_stops_the_study_and_every_process_it_started(tmp_path, signum, code):
    out = tmp_path / "study"
    proc = _start_normlab(
        "study", "--smoke", "--only", "init-depth", "train-eval-gap", "--jobs", "2", "--out", str(out)
    )
    started: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(_workers(proc.pid)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None and len(_workers(proc.pid)) == 2, "the study did not start its workers"
        deadline = time.monotonic() + 10  # until they are past start-up and running jobs
        while not all(map(_ignores_sigint, _workers(proc.pid))) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        started = _descendants(proc.pid)
        assert proc.poll() is None, "the study finished before it could be interrupted"
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)  # Ctrl-C in a terminal: the whole foreground group
        else:
            proc.send_signal(signum)  # kill PID, systemd, a job scheduler, the OOM killer: the main process only
        # Generous bounds: this checks that the run stops and cleans up, not how fast.
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in started if _alive(p)], "processes outlived the study"
        assert "Traceback" not in err, err
        state, page = _report(out)
        if signum == signal.SIGKILL:  # no clean-up ran: the report still says the run was in progress
            assert state["state"] == "running" and "the run was stopped before it finished" in page
        else:
            assert state["state"] == "interrupted" and state["pending"] == ["init-depth", "train-eval-gap"]
            assert "this report is partial" in page
    finally:  # on failure, leave nothing running: the workers share the study's process group
        if proc.poll() is None or any(_alive(p) for p in started):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
@pytest.mark.parametrize(
    "signum, code",
    [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGKILL, -9)],
    ids=["SIGTERM", "SIGINT", "SIGKILL"],
)
def test_a_signal_stops_the_demo_and_every_process_it_started(tmp_path, signum, code):
    """``normlab demo`` had a pool of its own: SIGTERM left its workers training on."""
    out = tmp_path / "demo.json"
    proc = _start_normlab("demo", "--epochs", "200", "--jobs", "2", "--out", str(out))
    started: list[int] = []
    try:
        deadline = time.monotonic() + 120
        # counted as any child processes: the demo's pool used to fork rather than spawn
        while len(_descendants(proc.pid)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None and len(_descendants(proc.pid)) >= 2, "the demo did not start its workers"
        deadline = time.monotonic() + 10
        while not all(map(_ignores_sigint, _workers(proc.pid))) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        started = _descendants(proc.pid)
        assert proc.poll() is None, "the demo finished before it could be interrupted"
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in started if _alive(p)], "processes outlived the demo"
        assert "Traceback" not in err, err
        assert not out.exists()  # no partial result passed off as the demo's
    finally:
        if proc.poll() is None or any(_alive(p) for p in started):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
