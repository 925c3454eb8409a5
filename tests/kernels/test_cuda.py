"""The CUDA path (composed torch ops) against torch.nn's CUDA kernels; skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import pair

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize(
    "name,args",
    [
        ("BatchNorm2d", (8,)),
        ("GroupNorm", (4, 8)),
        ("InstanceNorm2d", (8,)),
        ("LayerNorm", ((8, 5, 5),)),
        ("RMSNorm", ((5, 5),)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_torch(name, args, dtype):
    theirs, ours = pair(name, *args, dtype=dtype)
    theirs, ours = theirs.cuda(), ours.cuda()
    x = torch.randn(4, 8, 5, 5, device="cuda", dtype=dtype)
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    for mode in ("train", "eval"):
        getattr(theirs, mode)()
        getattr(ours, mode)()
        xt = x.clone().requires_grad_()
        xo = x.clone().requires_grad_()
        yt, yo = theirs(xt), ours(xo)
        torch.testing.assert_close(yo, yt, rtol=tol, atol=tol)
        dy = torch.randn_like(yt)
        yt.backward(dy)
        yo.backward(dy)
        torch.testing.assert_close(xo.grad, xt.grad, rtol=10 * tol, atol=10 * tol)
    for buf in ("running_mean", "running_var"):
        if getattr(theirs, buf, None) is not None:
            torch.testing.assert_close(getattr(ours, buf), getattr(theirs, buf), rtol=tol, atol=tol)
