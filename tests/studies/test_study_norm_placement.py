"""The norm-placement study: its transformer, its schedule, and its smoke setting finding
what Xiong et al. (2020) found at initialization."""

from __future__ import annotations

import json
import math

import pytest
import torch

import normlab as nl
from normlab.experiments import run_study
from normlab.experiments.studies.norm_placement import (
    PLACEMENTS,
    Config,
    TokenTransformer,
    gradient_at_init,
    lr_factor,
)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_transformer_uses_normlab_norms_where_its_placement_says(placement):
    torch.manual_seed(0)
    model = TokenTransformer(placement, depth=3)
    x = torch.randn(5, 1, 40)
    assert model(x).shape == (5, 10)
    norms = [m for m in model.modules() if isinstance(m, (nl.nn.LayerNorm, nl.nn.RMSNorm))]
    expected = {"post": 6, "pre": 7, "pre-rms": 7, "none": 0}[placement]  # two per block, plus a final one for pre-norm
    assert len(norms) == expected
    kinds = {type(m) for m in norms}
    assert kinds == ({nl.nn.RMSNorm} if placement == "pre-rms" else {nl.nn.LayerNorm} if norms else set())


def test_post_ln_blocks_end_normalized_and_pre_ln_residual_stream_does_not():
    torch.manual_seed(0)
    x = torch.randn(8, 10, 32) * 3 + 1
    post = TokenTransformer("post", depth=1).blocks[0](x)
    # Post-LN's block output is LayerNorm's (γ = 1, β = 0 at init): each token has mean 0, variance 1.
    torch.testing.assert_close(post.mean(-1), torch.zeros(8, 10), atol=1e-5, rtol=0)
    torch.testing.assert_close(post.var(-1, unbiased=False), torch.ones(8, 10), atol=1e-3, rtol=0)
    pre = TokenTransformer("pre", depth=1).blocks[0](x)
    assert pre.mean(-1).abs().mean() > 0.5  # the residual stream keeps the input's offset


def test_bad_arguments_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="placement must be one of"):
        TokenTransformer("middle")
    with pytest.raises(ValueError, match="length must be a multiple of patch"):
        TokenTransformer(patch=3)
    with pytest.raises(ValueError, match="width must be a multiple of heads"):
        TokenTransformer(width=30, heads=4)


def test_warm_up_is_linear_then_both_schedules_decay_alike():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(0, 100, 0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)  # half-way through the cosine after warm-up
    assert lr_factor(100, 100, 0) == pytest.approx(0.0, abs=1e-12)


def test_gradient_at_init_matches_autograd_on_one_block():
    torch.manual_seed(0)
    model = TokenTransformer("pre", depth=2)
    x, y = torch.randn(16, 1, 40), torch.randint(0, 10, (16,))
    grads = gradient_at_init(model, x, y)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert grads["ffn_out"][1] == pytest.approx(model.blocks[1].ffn_out.weight.grad.norm().item(), rel=1e-6)
    block = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.blocks[0].parameters()))
    assert grads["block"][0] == pytest.approx(block, rel=1e-6)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("norm-placement")
    return run_study("norm-placement", "smoke", out), out


def test_smoke_writes_its_result_and_figures(smoke):
    result, out = smoke
    assert json.loads((out / "result.json").read_text())["study"] == "norm-placement"
    assert [f["file"] for f in result["figures"]] == ["norm-placement-loss.png", "norm-placement-gradients.png"]
    assert all((out / f["file"]).stat().st_size > 1000 for f in result["figures"])
    config = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in result["config"].items()})
    runs = result["data"]["runs"]
    assert len(runs) == len(config.depths) * len(config.placements) * 2 * len(config.seeds)
    assert all(len(r["grad_ffn_out"]) == r["depth"] for r in runs)


def test_smoke_post_ln_gradient_near_the_output_is_larger_than_pre_ln(smoke):
    # Robust at this size: over seeds 0–29, Post-LN's last-layer W² gradient was 1.2–3.1×
    # Pre-LN's at depth 6 and 1.6–10× at depth 12, and Pre-LN's shrank from the first
    # layer to the last (last/first at most 0.74 at depth 12).
    grads = smoke[0]["data"]["grad_ffn_out_at_init"]
    for depth in (6, 12):
        assert grads[f"Post-LN, depth {depth}"][-1] > 1.1 * grads[f"Pre-LN, depth {depth}"][-1]
    pre = grads["Pre-LN, depth 12"]
    assert pre[-1] < pre[0]
    verdict = {c["what"].split(";")[0]: c["agrees"] for c in smoke[0]["comparison"]}
    assert verdict["At initialization Post-LN's gradients near the output are large"] in ("yes", "partly")
