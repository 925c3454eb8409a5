"""Building the CPU kernels: the cache key, the message, killed and concurrent builders,
a lock held too long, and build failures. Each build runs in a subprocess with its own
NORMLAB_BUILD_DIR, so the shared cache is never touched."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from normlab.core.kernels.cpu import build

STATUS = "from normlab.core.kernels import cpu; print(cpu.status(), flush=True)"
BOUND_S = 300  # a build takes about 20 s on an idle machine; the point is that it ends


def _env(build_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NORMLAB_BACKEND", "NORMLAB_BUILD_TIMEOUT")}
    return {**env, "NORMLAB_BUILD_DIR": str(build_dir), **extra}


def _start(build_dir: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", STATUS],
        env=_env(build_dir, **extra),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _finish(process: subprocess.Popen) -> tuple[str, str]:
    try:
        out, err = process.communicate(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"a process loading the kernels was still running after {BOUND_S} s")
    assert process.returncode == 0, err
    return out, err


def _entry(build_dir: Path) -> Path:
    return build_dir / build.build_name(build.installation())


def test_the_cache_key_names_the_torch_installation():
    fields = build.installation()
    assert fields["torch_dir"] == str(Path(torch.__file__).resolve().parent)
    assert fields["torch_version"] == torch.__version__
    hip = getattr(torch.version, "hip", None)
    assert fields["variant"] == (f"cuda{torch.version.cuda}" if torch.version.cuda else f"rocm{hip}" if hip else "cpu")
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in fields["python"]
    name = build.build_name(fields)
    assert name.isidentifier() and name.startswith("normlab_kernels_torch")
    assert build.build_name(dict(fields)) == name
    another_installation = {
        "torch_dir": "/elsewhere/.venv/lib/python3.11/site-packages/torch",
        "torch_version": "2.99.0+cpu",
        "torch_git": "0" * 40,
        "variant": "rocm9.9",
        "python": "cpython3.99",
        "cpu": "0" * 10,
        "source": "0" * 40,
        "flags": "-O2",
    }
    assert set(another_installation) == set(fields)
    for field, value in another_installation.items():
        assert value != fields[field]
        assert build.build_name({**fields, field: value}) != name, field


@pytest.mark.slow
def test_killed_builders_never_block_and_concurrent_builders_build_once(tmp_path):
    # Two builders are killed mid-build (SIGTERM, then SIGKILL), each once torch's lock file
    # exists in its build directory: the lock on which, before, every later process waited
    # forever. The rest of each one's process group is then stopped too, so that orphaned
    # compilers do not slow the test; the files they left stay as they were.
    entry = _entry(tmp_path)
    left: set[Path] = set()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        builder = _start(tmp_path)
        said: list[str] = []
        for line in iter(builder.stderr.readline, ""):  # torch may warn first (a CUDA build without CUDA)
            said.append(line.strip())
            if line.strip() == build.BUILD_MESSAGE:
                break
        assert build.BUILD_MESSAGE in said, said
        deadline = time.monotonic() + BOUND_S
        while not set(entry.glob("tmp-*/lock")) - left and time.monotonic() < deadline:
            time.sleep(0.05)
        locks = set(entry.glob("tmp-*/lock")) - left
        assert locks, "the builder never took torch's lock"
        builder.send_signal(sig)
        builder.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # the whole group may be gone already
            os.killpg(builder.pid, signal.SIGKILL)  # the compiler it started, if still running
        builder.communicate()
        left |= locks
    assert any(lock.exists() for lock in left), "no stale lock was left to test against"

    # Two processes started together: both load the kernels, one of them built them.
    first, second = _start(tmp_path), _start(tmp_path)
    (out1, err1), (out2, err2) = _finish(first), _finish(second)
    for out in (out1, out2):
        assert out.startswith(f"kernels loaded from {entry}"), out
    assert (err1 + err2).count(build.BUILD_MESSAGE) == 1, err1 + err2
    assert not list(entry.glob("tmp-*")), "the killed builders' directories were not removed"

    # Once built: no message, no build.
    out, err = _finish(_start(tmp_path))
    assert out.startswith("kernels loaded") and build.BUILD_MESSAGE not in err


def test_a_lock_held_too_long_ends_in_the_composed_ops_with_the_reason(tmp_path):
    entry = _entry(tmp_path)
    entry.mkdir(parents=True)
    with open(entry / "normlab.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242 on a-builder-that-hangs\n")
        held.flush()
        started = time.monotonic()
        out, err = _finish(_start(tmp_path, NORMLAB_BUILD_TIMEOUT="1"))
        assert time.monotonic() - started < 60
    assert "waiting for another process (pid 4242 on a-builder-that-hangs)" in err
    assert "could not be built (TimeoutError: another process (pid 4242" in err
    assert out.startswith("kernels unavailable (TimeoutError"), out
    assert "NORMLAB_BUILD_TIMEOUT" in out


def test_a_compile_error_is_reported_by_its_first_error_line(tmp_path):
    compiler = tmp_path / "broken-c++"
    compiler.write_text(
        "#!/bin/sh\n"
        'case "$1" in --version|-v) exec c++ "$@";; esac\n'
        'echo "kernels.cpp:1:1: error: this compiler is broken on purpose" >&2\n'
        "exit 1\n"
    )
    compiler.chmod(0o755)
    out, err = _finish(_start(tmp_path, CXX=str(compiler)))
    assert build.BUILD_MESSAGE in err
    assert "could not be built (RuntimeError: kernels.cpp:1:1: error: this compiler is broken on purpose)" in err
    assert out.startswith("kernels unavailable"), out
    log = _entry(tmp_path) / "build-error.log"
    assert f"the full build output is in {log}" in out
    assert "this compiler is broken on purpose" in log.read_text()
    assert not list(_entry(tmp_path).glob("tmp-*")), "the failed build's directory was left behind"


def test_an_unreadable_timeout_setting_is_named(monkeypatch):
    monkeypatch.setenv("NORMLAB_BUILD_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="NORMLAB_BUILD_TIMEOUT must be a number of seconds, got 'soon'"):
        build._timeout()


# pybind11's rendering of each C++ parameter type, by the schema type the operator declares
_BOUND_TYPE = {
    "Tensor": "torch.Tensor",
    "Optional[Tensor]": "torch.Tensor | None",
    "int": "typing.SupportsInt | typing.SupportsIndex",  # SymInt in the schema
    "float": "typing.SupportsFloat | typing.SupportsIndex",
    "bool": "bool",
}


def _bound_parameters(function: object) -> list[str]:
    """The parameter types pybind11 wrote into a bound function's first docstring line."""
    first = str(getattr(function, "__doc__", "")).strip().splitlines()[0]
    inside = first[first.index("(") + 1 : first.rindex(") ->")]
    return [part.split(": ", 1)[1] for part in re.split(r", (?=arg\d+:)", inside)]


def test_each_declared_schema_is_what_its_compiled_body_takes():
    """The operators' schemas are the only Python declaration of what entries.cpp's bodies
    take: each must match the binding's parameter types, in order."""
    from normlab.core.kernels.cpu import operators

    module = build.load()
    if module is None:
        pytest.skip(build.status())
    assert set(operators.BODIES) == {
        "channel_forward",
        "channel_backward",
        "masked_channel_backward",
        "row_forward",
        "row_backward",
        "add_row_forward",
        "add_row_backward",
    }
    for entry, (schema, inplace_flag_at) in operators.BODIES.items():
        declared = [_BOUND_TYPE[str(argument.type)] for argument in torch._C.parse_schema(schema).arguments]
        if inplace_flag_at is not None:
            declared.insert(inplace_flag_at, "bool")
        assert _bound_parameters(getattr(module, entry)) == declared, entry
        assert str(getattr(module, entry).__doc__).strip().splitlines()[0].endswith("-> list[torch.Tensor]")
        registered = getattr(torch.ops.normlab, schema.split("(")[0].split("::")[1]).default._schema
        assert str(registered) == schema
