"""One core, many groupings: the identities that say the layers are the same computation."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import normlab as nl
import normlab.functional as F


@st.composite
def nchw(draw):
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 4)), draw(st.integers(2, 4)))
    return shape, draw(st.integers(0, 2**31 - 1))


@given(nchw())
def test_layernorm_over_chw_equals_groupnorm_with_one_group(case):
    shape, seed = case
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    c = shape[1]
    w = torch.randn(c, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)
    gn = F.group_norm(x, 1, w, b)
    # LayerNorm's elementwise affine, holding the per-channel values of GroupNorm's.
    ln = F.layer_norm(x, shape[1:], w[:, None, None].expand(shape[1:]), b[:, None, None].expand(shape[1:]))
    torch.testing.assert_close(ln, gn, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(gn)
    for a, e in zip(torch.autograd.grad(ln, (x, w, b), dy), torch.autograd.grad(gn, (x, w, b), dy)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@given(nchw())
def test_instancenorm_equals_groupnorm_with_one_group_per_channel(case):
    shape, seed = case
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    c = shape[1]
    w = torch.randn(c, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)
    gn = F.group_norm(x, c, w, b)
    inst = F.instance_norm(x, None, None, w, b)
    torch.testing.assert_close(inst, gn, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(gn)
    for a, e in zip(torch.autograd.grad(inst, (x, w, b), dy), torch.autograd.grad(gn, (x, w, b), dy)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_modules_agree_too():
    x = torch.randn(2, 6, 5, 5)
    gn1, ln = nl.nn.GroupNorm(1, 6, affine=False), nl.nn.LayerNorm((6, 5, 5), elementwise_affine=False)
    gnc, inorm = nl.nn.GroupNorm(6, 6, affine=False), nl.nn.InstanceNorm2d(6)
    torch.testing.assert_close(gn1(x), ln(x))
    torch.testing.assert_close(gnc(x), inorm(x))


def test_batchnorm_on_one_sample_equals_instancenorm():
    # With N = 1 the batch statistics of a channel are that instance's statistics.
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(F.batch_norm(x, None, None, training=True), F.instance_norm(x))


def test_rmsnorm_equals_layernorm_on_zero_mean_rows():
    x = torch.randn(5, 8, dtype=torch.float64)
    x = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(F.rms_norm(x, (8,), eps=1e-5), F.layer_norm(x, (8,), eps=1e-5))
