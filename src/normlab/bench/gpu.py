"""``normlab bench gpu``: everything a GPU should be asked, in one prepared run of under 8
minutes — the CUDA tests, the Triton kernels against torch.nn, ``bench layers``, ``bench
models`` and ``bench memory`` on ``cuda`` — with every ratio printed under the card's name.

Each step runs in a subprocess with a time limit of its own (the limits add up to
:data:`BUDGET_S`), so one step that hangs or fails costs only its share and the others
still report. Without a CUDA device the run says so and does nothing (exit 0), so that it
can sit in a script that also runs on machines without one.

:func:`time_triton_rows` is the Triton step: the calls of the traffic model
(:mod:`normlab.bench.traffic`) timed forward and forward+backward against torch.nn's
equivalent, with the effective bandwidth (the bytes any implementation must move: read x,
write y; read x and dy, write dx) as a share of a device-to-device copy's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["BUDGET_S", "Step", "card_name", "cuda_tests", "plan", "run_steps", "time_triton_rows"]

#: seconds for all steps together: under the 8 minutes the run promises, start-up included
BUDGET_S = 450


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]
    timeout_s: int


def card_name(device: torch.device | str = "cuda") -> str:
    """``NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)`` — or why there is no card."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    dev = torch.device(device)
    props = torch.cuda.get_device_properties(dev)
    return f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.1f} GiB)"


def plan(*, tests_dir: Path | None, out_dir: Path | None, quick: bool = False) -> list[Step]:
    """The steps and their time limits (seconds). ``tests_dir``: the repository's tests/ (the
    CUDA tests are skipped without it); ``out_dir``: where each benchmark writes its JSON."""
    python = (sys.executable,)
    normlab = python + ("-m", "normlab")

    def out(name: str) -> tuple[str, ...]:
        return ("--out", str(out_dir / f"{name}.json")) if out_dir is not None else ()

    steps = []
    tests = cuda_tests(tests_dir) if tests_dir is not None else ()
    if tests:
        steps.append(Step("CUDA tests", python + ("-m", "pytest", "-q", "-p", "no:cacheprovider", *tests), 150))
    steps += [
        Step("Triton kernels vs torch.nn", normlab + ("bench", "triton", "--device", "cuda", *out("triton")), 60),
        Step(
            "bench layers",
            normlab + ("bench", "layers", "--device", "cuda", "--quick", "--threads", "1", *out("layers")),
            60 if quick else 80,
        ),
        Step(
            "bench models",
            normlab
            + ("bench", "models", "--device", "cuda", "--quick", "--threads", "1", "--markdown")
            + (("--no-compile",) if quick else ())
            + out("models"),
            60 if quick else 110,
        ),
        Step("bench memory", normlab + ("bench", "memory", "--device", "cuda", "--batch", "32", *out("memory")), 40),
    ]
    total = sum(step.timeout_s for step in steps)
    assert total <= BUDGET_S, f"the steps' limits ({total} s) exceed the budget ({BUDGET_S} s)"
    return steps


#: the test files that exercise CUDA: torch's kernels through normlab, and the Triton kernels
CUDA_TEST_FILES = ("test_cuda.py", "test_triton_kernels.py")


def cuda_tests(tests_dir: Path) -> tuple[str, ...]:
    """The CUDA test files under ``tests_dir`` (at any depth), or () when there are none."""
    return tuple(str(path) for name in CUDA_TEST_FILES for path in sorted(tests_dir.rglob(name)))


def run_steps(steps: list[Step], card: str, echo: Callable[[str], None] = print) -> list[dict]:
    """Run each step, print its output under the card's name, and return what happened."""
    results = []
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compiled kernels on the GPU, whatever the caller's shell says
    for step in steps:
        echo(f"\n=== {step.name} on {card} (limit {step.timeout_s} s) ===")
        start = time.perf_counter()
        try:
            done = subprocess.run(step.argv, capture_output=True, text=True, timeout=step.timeout_s, env=env)
            rc, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as expired:
            rc = None
            output = _text(expired.stdout) + _text(expired.stderr) + f"\n(stopped after {step.timeout_s} s)"
        elapsed = time.perf_counter() - start
        for line in output.rstrip().splitlines():
            echo(f"[{card}] {line}")
        results.append({"step": step.name, "returncode": rc, "seconds": round(elapsed, 1)})
    return results


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


# --- the Triton step ---------------------------------------------------------------------------


def time_triton_rows(device: str = "cuda", repeats: int = 25, small: bool = False) -> list[dict]:
    """Each call of the traffic model, Triton kernels vs torch.nn: median times forward and
    forward+backward, their ratios, agreement, and the effective bandwidth as a share of a
    device copy's. ``small``: tiny shapes (a check that every row runs, e.g. under the
    interpreter; the times then mean nothing).

    Two ways to the kernels are timed: ``triton``, their entry called directly, and ``layer``,
    normlab's module routed to them by the path rule (backend "triton") — what a model gets,
    the rule's question and the module's checks included."""
    from ..core.paths import backend, set_backend
    from .common import device_clock, max_rel_diff
    from .timing import interleaved_medians
    from .traffic import CASES

    dev = torch.device(device)
    clock = device_clock(dev)
    rows = []
    previous = backend()
    set_backend("triton")  # the layers' calls; torch.nn and the direct entry do not ask the rule
    try:
        for case in CASES(small=small):
            rows.append(_time_triton_row(case, device, repeats, clock, interleaved_medians, max_rel_diff))
    finally:
        set_backend(previous)
    return rows


def _time_triton_row(case, device, repeats, clock, interleaved_medians, max_rel_diff) -> dict:
    """One row of :func:`time_triton_rows`."""
    make_theirs, make_ours, make_layer = case.torch_nn(device), case.triton(device), case.normlab(device)
    torch.manual_seed(0)
    theirs = make_theirs()
    torch.manual_seed(0)
    ours = make_ours()
    torch.manual_seed(0)
    layer = make_layer()
    y_t, y_o, y_l = _first(theirs()), _first(ours()), _first(layer())
    agree = max(max_rel_diff(y_o.detach(), y_t.detach()), max_rel_diff(y_l.detach(), y_t.detach()))
    x_bytes = y_t.numel() * y_t.element_size()
    src = torch.empty_like(y_t.detach())
    dst = torch.empty_like(src)

    def both(forward):
        def run():
            outputs = forward()
            outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
            torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])

        return run

    fwd = interleaved_medians(
        {"copy": lambda dst=dst, src=src: dst.copy_(src), "torch": theirs, "triton": ours, "layer": layer},
        repeats,
        clock=clock,
        shuffle=True,
    )
    fb = interleaved_medians(
        {"torch": both(theirs), "triton": both(ours), "layer": both(layer)}, repeats, clock=clock, shuffle=True
    )
    copy_bw = 2 * x_bytes / fwd["copy"]
    return {
        "call": case.name,
        "fwd_ms": {k: v * 1e3 for k, v in fwd.items()},
        "fb_ms": {k: v * 1e3 for k, v in fb.items()},
        "fwd_speedup": fwd["torch"] / fwd["triton"],
        "fb_speedup": fb["torch"] / fb["triton"],
        "layer_fwd_speedup": fwd["torch"] / fwd["layer"],
        "layer_fb_speedup": fb["torch"] / fb["layer"],
        # the least any implementation moves: x in, y out; then x and dy in, dx out
        "fwd_bandwidth_vs_copy": (2 * x_bytes / fwd["triton"]) / copy_bw,
        "fb_bandwidth_vs_copy": (5 * x_bytes / fb["triton"]) / copy_bw,
        "max_rel_diff": agree,
    }


def _first(y):
    return y[0] if isinstance(y, tuple) else y


def format_triton_rows(rows: list[dict], card: str) -> str:
    lines = [
        f"Triton kernels vs torch.nn on {card}: speed-up (torch.nn time / Triton time) of the kernels' "
        "entry and of normlab's layer routed to them, effective bandwidth as a share of a device "
        "copy's, max relative difference",
        f"{'call':<62}{'fwd x':>7}{'f+b x':>7}{'layer fwd':>10}{'layer f+b':>10}{'fwd bw':>8}{'f+b bw':>8}{'diff':>9}",
    ]
    for r in rows:
        lines.append(
            f"{r['call']:<62}{r['fwd_speedup']:>7.2f}{r['fb_speedup']:>7.2f}"
            f"{r['layer_fwd_speedup']:>10.2f}{r['layer_fb_speedup']:>10.2f}"
            f"{r['fwd_bandwidth_vs_copy']:>8.0%}{r['fb_bandwidth_vs_copy']:>8.0%}{r['max_rel_diff']:>9.1e}"
        )
    return "\n".join(lines)
