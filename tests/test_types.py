"""The public API is typed: mypy (configured in pyproject.toml) is clean, and the wheel ships py.typed.

mypy takes about 35 s of CPU (it reads torch's annotations); its cache goes to a temporary
folder, so nothing is written into the tree.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mypy_is_clean(tmp_path):
    pytest.importorskip("mypy", reason="mypy is not installed (it is in the test extra)")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy-cache")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_mypy_reports_an_error_in_a_checked_module(tmp_path):
    """The configuration really checks: a wrong annotation in a file like the checked ones fails."""
    pytest.importorskip("mypy", reason="mypy is not installed (it is in the test extra)")
    bad = tmp_path / "bad.py"
    bad.write_text("def f(x: int) -> str:\n    return x\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            str(bad),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "Incompatible return value type" in result.stdout, result.stdout


@pytest.mark.slow
def test_the_wheel_ships_py_typed(tmp_path):
    assert (ROOT / "src" / "normlab" / "py.typed").is_file()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 and "No module named" in result.stderr:
        pytest.skip(f"cannot build a wheel here: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("normlab-*.whl")
    assert "normlab/py.typed" in zipfile.ZipFile(wheel).namelist()
