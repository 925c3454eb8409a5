"""The kernels' streaming-store route gives the same values as the cached one.

Outputs larger than three quarters of the last-level cache are written through an L1 buffer
with non-temporal stores (loops.h's emit and emit_four_rows); the tests' tensors are far
smaller, so that route would run only in benchmarks. NORMLAB_STREAM_BYTES (read once per
process) lowers the threshold, so a child process runs every output through it: channels_last
BatchNorm, BatchNormAct and GroupNorm whose C (200) spans two of the four-row buffer's parts
and whose row counts leave a remainder after the four-row sweeps, and NCHW BatchNorm, each
forward and backward against float64 torch.nn.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from normlab import core

pytestmark = pytest.mark.skipif(not core.kernels_available(), reason="the kernels are not built here")

CHILD = r"""
import copy, torch, normlab as nl
from normlab import core
from torch import nn

def rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()

cases = [
    (nl.nn.BatchNorm2d(200), nn.BatchNorm2d(200), (3, 200, 3, 3), True),
    (nl.nn.BatchNormAct2d(200, activation="silu"), nn.Sequential(nn.BatchNorm2d(200), nn.SiLU()), (2, 200, 5, 3), True),
    (nl.nn.GroupNorm(8, 200), nn.GroupNorm(8, 200), (2, 200, 3, 3), True),
    (nl.nn.BatchNorm2d(24), nn.BatchNorm2d(24), (3, 24, 5, 7), False),
]
worst = 0.0
for ours, theirs, shape, channels_last in cases:
    for train in (True, False):
        ours.train(train), theirs.train(train)
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(shape, generator=g) * 1.5 + 0.5).double()
        dy = torch.randn(shape, generator=g).double()
        (theirs[0] if isinstance(theirs, nn.Sequential) else theirs).load_state_dict(
            {k: v for k, v in ours.state_dict().items() if not k.startswith("act.")})
        ref = copy.deepcopy(theirs).double()
        x32 = x.float()
        if channels_last:
            x32 = x32.contiguous(memory_format=torch.channels_last)
        x32.requires_grad_()
        x64 = x.clone().requires_grad_()
        with core.record_dispatch() as log:
            y = ours(x32)
        assert log and all(path == "kernels" for _, path, _ in log), log
        y.backward(dy.float())
        y64 = ref(x64)
        y64.backward(dy)
        worst = max(worst, rel(y, y64), rel(x32.grad, x64.grad))
print(worst)
"""


def test_streaming_stores_match_float64():
    env = {**os.environ, "NORMLAB_STREAM_BYTES": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split()[-1]) <= 1e-6, done.stdout
