"""normlab.core against a float64 NumPy reference of the textbook formulas, and gradcheck."""

from __future__ import annotations

import numpy as np
import numpy_reference as ref
import pytest
import torch

from normlab import core

# (name, input shape, reduction dims, affine shape): every grouping the layers use.
GROUPINGS = [
    ("batch", (5, 4, 3, 2), (0, 2, 3), (1, 4, 1, 1)),
    ("batch-1d", (7, 3), (0,), (1, 3)),
    ("instance", (3, 4, 5, 2), (2, 3), (1, 4, 1, 1)),
    ("group", (3, 2, 3, 4, 2), (2, 3, 4), (1, 2, 3, 1, 1)),  # (N, G, C//G, H, W)
    ("layer", (3, 4, 6), (2,), (1, 1, 6)),
    ("layer-2d", (3, 4, 5), (1, 2), (1, 4, 5)),
]


def _batch_stats(x, dims, centered):
    with torch.no_grad():
        if not centered:
            return core.NormStats(None, None, torch.rsqrt(core.mean_square(x, dims) + 1e-5))
        shift, offset, var = core.centered_moments(x, dims)
        return core.NormStats(shift, offset, torch.rsqrt(var + 1e-5))


def _given_stats(mean, var, centered):
    return core.NormStats(mean if centered else None, None, torch.rsqrt(var + 1e-5))


@pytest.mark.parametrize("centered", [True, False], ids=["centered", "rms"])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch-stats", "given-stats"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("name,shape,dims,affine_shape", GROUPINGS, ids=[g[0] for g in GROUPINGS])
def test_matches_numpy_textbook_formulas(name, shape, dims, affine_shape, affine, batch_stats, centered):
    rng = np.random.default_rng(1)
    x = rng.normal(1.5, 2.0, size=shape)
    gamma = rng.normal(1.0, 0.5, size=affine_shape) if affine else None
    beta = rng.normal(0.0, 0.5, size=affine_shape) if affine and centered else None
    dy = rng.normal(size=shape)
    eps = 1e-5
    given = None
    if not batch_stats:
        # Eval mode: statistics unrelated to this x (a "running" estimate).
        stat_shape = [1 if d in dims else s for d, s in enumerate(shape)]
        given = (
            rng.normal(size=stat_shape) if centered else np.zeros(stat_shape),
            rng.uniform(0.5, 2.0, size=stat_shape),
        )

    y_np, cache = ref.forward(x, gamma, beta, dims, eps, centered=centered, stats=given)
    dx_np, dgamma_np, dbeta_np = ref.backward(dy, cache)

    xt = torch.tensor(x, requires_grad=True)
    wt = None if gamma is None else torch.tensor(gamma, requires_grad=True)
    bt = None if beta is None else torch.tensor(beta, requires_grad=True)
    if batch_stats:
        stats = _batch_stats(xt, dims, centered)
    else:
        stats = _given_stats(torch.tensor(given[0]), torch.tensor(given[1]), centered)
    y = core.normalize(xt, wt, bt, stats, dims, eps, batch_stats=batch_stats)
    y.backward(torch.tensor(dy))

    np.testing.assert_allclose(y.detach().numpy(), y_np, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(xt.grad.numpy(), dx_np, rtol=1e-10, atol=1e-12)
    if wt is not None:
        np.testing.assert_allclose(wt.grad.numpy(), dgamma_np, rtol=1e-10, atol=1e-12)
    if bt is not None:
        np.testing.assert_allclose(bt.grad.numpy(), dbeta_np, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("centered", [True, False], ids=["centered", "rms"])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch-stats", "given-stats"])
@pytest.mark.parametrize("name,shape,dims,affine_shape", GROUPINGS, ids=[g[0] for g in GROUPINGS])
def test_gradcheck_and_gradgradcheck(name, shape, dims, affine_shape, batch_stats, centered):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(affine_shape, dtype=torch.float64) + 1).requires_grad_()
    b = torch.randn(affine_shape, dtype=torch.float64, requires_grad=True)
    given = None
    if not batch_stats:
        stat_shape = [1 if d in dims else s for d, s in enumerate(shape)]
        given = (torch.randn(stat_shape, dtype=torch.float64), torch.rand(stat_shape, dtype=torch.float64) + 0.5)

    def fn(x, w, b):
        if batch_stats:
            stats = _batch_stats(x, dims, centered)
        else:
            stats = _given_stats(given[0], given[1], centered)
        return core.normalize(x, w, b, stats, dims, 1e-5, batch_stats=batch_stats)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_closed_form_backward_agrees_with_composed_reference_float32():
    x = torch.randn(8, 16, 7, 7, requires_grad=True)
    w = torch.randn(1, 16, 1, 1, requires_grad=True)
    b = torch.randn(1, 16, 1, 1, requires_grad=True)
    dims = (0, 2, 3)
    y, _ = core.normalize_batch(x, w, b, dims, 1e-5)
    y_ref = core.reference_normalize(x, w, b, dims, 1e-5)
    dy = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, w, b), dy)
    theirs = torch.autograd.grad(y_ref, (x, w, b), dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


# --- moments ------------------------------------------------------------------------


def test_variance_of_large_mean_small_spread_float32():
    x = 1e4 + 0.01 * torch.randn(64, 32, 8, 8)
    dims = (0, 2, 3)
    var = core.centered_moments(x, dims).var
    exact = x.double().var(dim=dims, correction=0, keepdim=True)  # same float32 values
    rel = ((var.double() - exact).abs() / exact).max().item()
    assert torch.isfinite(var).all()
    assert rel < 1e-3, rel


def test_naive_variance_fails_where_ours_holds():
    # The check above has teeth: the one-pass E[x²] − E[x]² in float32 is nowhere near.
    x = 1e4 + 0.01 * torch.randn(64, 32, 8, 8)
    dims = (0, 2, 3)
    naive = (x * x).mean(dims) - x.mean(dims) ** 2
    exact = x.double().var(dim=dims, correction=0)
    rel = ((naive.double() - exact).abs() / exact).max().item()
    assert rel > 1e-1 or not torch.isfinite(naive).all() or (naive < 0).any()


def test_normalized_output_of_large_mean_data_is_accurate():
    x = 1e4 + 0.01 * torch.randn(16, 8, 5, 5)
    dims = (0, 2, 3)
    y, _ = core.normalize_batch(x, None, None, dims, 1e-5)
    y64 = core.reference_normalize(x.double(), None, None, dims, 1e-5)
    # torch.nn (and any normalization by the float32-rounded mean) is off by up to
    # half an ulp of 1e4 over a std of 0.01: about 0.05 here.
    assert (y.double() - y64).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_statistics_accumulate_in_float32(dtype):
    x = (3 + torch.randn(32, 16, 16, 16)).to(dtype)
    moments = core.centered_moments(x, (0, 2, 3))
    mean, var = moments.mean, moments.var
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    exact_var, exact_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0, keepdim=True)
    torch.testing.assert_close(mean.double(), exact_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), exact_var, rtol=1e-4, atol=1e-5)


def test_merge_moments_uneven_and_empty_parts_are_exact():
    x = torch.randn(23, 5, dtype=torch.float64) * 3 + 7
    bounds = [0, 4, 4, 15, 23]  # parts of 4, 0, 11 and 8 rows
    counts, means, m2s = [], [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part = x[lo:hi]
        counts.append(torch.full((5,), hi - lo, dtype=torch.long))
        means.append(part.mean(0) if hi > lo else torch.full((5,), float("nan"), dtype=x.dtype))
        m2s.append(((part - part.mean(0)) ** 2).sum(0) if hi > lo else torch.zeros(5, dtype=x.dtype))
    merged = core.merge_moments(core.Moments(torch.stack(counts), torch.stack(means), torch.stack(m2s)))
    assert merged.count.tolist() == [23] * 5
    torch.testing.assert_close(merged.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.var, x.var(0, correction=0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.unbiased_var(), x.var(0), rtol=1e-12, atol=1e-12)


def test_unbiased_variance_of_a_single_element_is_nan():
    m = core.Moments(torch.tensor([1, 0, 3]), torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 2.0]))
    unbiased = m.unbiased_var()
    assert torch.isnan(unbiased[0]) and torch.isnan(unbiased[1]) and unbiased[2] == 1.0
    torch.testing.assert_close(m.var, torch.tensor([0.0, 0.0, 2.0 / 3.0]))


def test_reference_normalize_with_a_given_rstd_and_no_mean_says_what_is_missing():
    # found by the type check: centered with a given rstd subtracted None (an unexplained TypeError)
    x = torch.randn(4, 3, dtype=torch.float64)
    rstd = torch.ones(1, 3, dtype=torch.float64)
    with pytest.raises(core.InputTypeError, match="needs the mean too"):
        core.reference_normalize(x, None, None, (0,), 1e-5, rstd=rstd)
    # given both, or not centered, it normalizes with them
    mean = x.mean(0, keepdim=True)
    torch.testing.assert_close(
        core.reference_normalize(x, None, None, (0,), 1e-5, mean=mean, rstd=rstd), x - mean, rtol=0, atol=0
    )
    torch.testing.assert_close(core.reference_normalize(x, None, None, (0,), 1e-5, centered=False, rstd=rstd), x)


def test_batch_renorm_with_a_policy_that_holds_no_estimates_says_so():
    # found by the type check: training read running_var of a policy without it (an AttributeError on None)
    x = torch.randn(4, 3, 2)
    running = core.RunningStats({"running_mean": None, "running_var": None}, 0.1, True, "skip")
    with pytest.raises(core.InputError, match="holds none"):
        core.batch_renorm(x, None, None, eps=1e-5, batch_stats=True, running=running, r_max=3.0, d_max=5.0)


@pytest.mark.parametrize("given", ["mean", "rstd"])
def test_masked_reference_refuses_half_of_the_fixed_statistics(given):
    # found by the type check: a mean alone multiplied by None; an rstd alone was silently recomputed
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    mask = torch.ones(3, 1, 4, dtype=torch.bool)
    stat = {given: torch.ones(1, 2, 1, dtype=torch.float64)}
    with pytest.raises(core.InputTypeError, match=f"got only {given}"):
        core.masked_reference(x, None, None, mask, (0, 2), 1e-5, **stat)
    mean, rstd = torch.zeros(1, 2, 1, dtype=torch.float64), torch.full((1, 2, 1), 2.0, dtype=torch.float64)
    torch.testing.assert_close(core.masked_reference(x, None, None, mask, (0, 2), 1e-5, mean=mean, rstd=rstd), 2 * x)
