"""The studies' Adam and AdamW run torch's foreach path (training.adam) for speed; their
numbers must stay those of torch's default CPU path, the one-parameter loop, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from normlab.experiments.char_lm import CharTransformer
from normlab.experiments.training import adam


def _train(make_optimizer, steps: int = 6) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = CharTransformer(11, "layer", depth=2, width=16, heads=2, context=8)
    optimizer = make_optimizer(model)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 11, (4, 9), generator=generator)
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("decoupled", [False, True], ids=["Adam", "AdamW"])
def test_adam_foreach_equals_the_loop_bit_for_bit(decoupled: bool) -> None:
    torch_class = torch.optim.AdamW if decoupled else torch.optim.Adam
    options = {"lr": 3e-2, "betas": (0.9, 0.95), "weight_decay": 0.1}
    ours = _train(lambda m: adam(m.parameters(), decoupled=decoupled, **options))
    loop = _train(lambda m: torch_class(m.parameters(), foreach=False, **options))
    start = _train(lambda m: torch_class(m.parameters(), **options), steps=0)
    assert any(not torch.equal(a, b) for a, b in zip(ours, start))  # it trained
    assert all(torch.equal(a, b) for a, b in zip(ours, loop))


def test_adam_is_the_foreach_path() -> None:
    optimizer = adam([torch.zeros(3, requires_grad=True)], decoupled=True, lr=1e-3)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["foreach"] is True
