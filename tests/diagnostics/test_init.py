"""normlab.init: gains and their sources, the initializers' distributions, LSUV."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import normlab.init as I

N = 200_000  # draws: sample std within ~0.3% of the target


def _big(shape=(400, 500)):
    return torch.empty(shape)


def test_gain_table_follows_the_derivations():
    assert I.gain("tanh") == 1.0  # Glorot & Bengio: the bound as derived is for tanh
    assert I.gain("sigmoid") == 4.0 * I.gain("tanh")  # slope 1/4 at 0: four times the bound
    assert I.gain("relu") == pytest.approx(math.sqrt(2))
    assert I.gain("leaky_relu", 0.2) == pytest.approx(math.sqrt(2 / 1.04))
    assert I.gain("linear") == I.gain("identity") == I.gain("conv") == 1.0


@pytest.mark.parametrize(
    "activation,param",
    [
        ("linear", None),
        ("conv1d", None),
        ("tanh", None),
        ("sigmoid", None),
        ("relu", None),
        ("leaky_relu", None),
        ("leaky_relu", 0.3),
        ("selu", None),
    ],
)
def test_torch_convention_reproduces_calculate_gain(activation, param):
    ours = "conv" if activation.startswith("conv") else activation
    assert I.gain(ours, param, convention="torch") == pytest.approx(nn.init.calculate_gain(activation, param))


def test_gain_errors():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        I.gain("swish")
    with pytest.raises(ValueError, match="convention must be"):
        I.gain("tanh", convention="keras")
    with pytest.raises(ValueError, match="torch.nn.init.calculate_gain defines no gain for 'gelu'"):
        I.gain("gelu", convention="torch")


def test_xavier_uniform_is_glorots_bound():
    w = I.xavier_uniform_(_big())
    bound = math.sqrt(6 / (400 + 500))
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.999 * bound  # the bound is reached, not just respected
    sig = I.xavier_uniform_(_big(), activation="sigmoid")
    assert sig.abs().max() <= 4 * bound and sig.abs().max() > 0.999 * 4 * bound


@pytest.mark.parametrize(
    "fn,kwargs,expected",
    [
        (I.xavier_normal_, {}, math.sqrt(2 / 900)),
        (I.xavier_normal_, {"activation": "relu"}, math.sqrt(2) * math.sqrt(2 / 900)),
        (I.he_normal_, {}, math.sqrt(2 / 500)),
        (I.he_normal_, {"mode": "fan_out"}, math.sqrt(2 / 400)),
        (I.he_uniform_, {}, math.sqrt(2 / 500)),
        (I.he_normal_, {"activation": "leaky_relu", "negative_slope": 0.1}, math.sqrt(2 / 1.01 / 500)),
        (I.lecun_normal_, {}, math.sqrt(1 / 500)),
        (I.xavier_normal_, {"gain": 3.0}, 3 * math.sqrt(2 / 900)),
    ],
)
def test_distributions_have_the_documented_std(fn, kwargs, expected):
    w = fn(_big(), **kwargs)
    assert w.mean().abs() < 0.01 * expected * 10
    assert w.std().item() == pytest.approx(expected, rel=0.01)


def test_conv_fans_follow_torch():
    w = torch.empty(16, 8, 3, 3)
    assert I.fans(w) == (8 * 9, 16 * 9)
    assert I.fans(w) == nn.init._calculate_fan_in_and_fan_out(w)
    with pytest.raises(ValueError, match="at least 2 dims"):
        I.fans(torch.empty(5))
    with pytest.raises(ValueError, match="mode must be"):
        I.he_normal_(w, mode="fan_avg")


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (16, 8, 3, 3)])
def test_orthogonal_rows_or_columns_are_orthonormal(shape):
    w = I.orthogonal_(torch.empty(shape), activation="relu")
    flat = w.reshape(shape[0], -1) / math.sqrt(2)
    small = min(flat.shape)
    gram = flat @ flat.T if flat.shape[0] == small else flat.T @ flat
    torch.testing.assert_close(gram, torch.eye(small), rtol=1e-5, atol=1e-5)


def test_generators_make_draws_reproducible():
    a = I.he_normal_(torch.empty(10, 10), generator=torch.Generator().manual_seed(3))
    b = I.he_normal_(torch.empty(10, 10), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_designs_names_exist():
    assert I.xavier_ is I.xavier_uniform_ and callable(I.he_)


# --- LSUV ---------------------------------------------------------------------------------


def _mlp(depth=8, width=64, act=nn.Tanh):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), act()]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
def test_lsuv_gives_unit_std_outputs_within_tol(act):
    torch.manual_seed(0)
    model = _mlp(act=act)
    batch = torch.randn(256, 64) * 5 + 2
    result = I.lsuv_(model, batch, tol=0.05)
    assert [r.name for r in result] == [str(i) for i in range(0, 16, 2)]  # execution order
    stds = {}
    hooks = [
        model[i].register_forward_hook(lambda m, a, o, i=i: stds.__setitem__(i, o.std().item()))
        for i in range(0, 16, 2)
    ]
    with torch.no_grad():
        model(batch)
    for h in hooks:
        h.remove()
    assert all(abs(s - 1.0) < 0.05 for s in stds.values()), stds
    assert all(r.converged and r.iterations >= 1 for r in result)
    assert all(r.scale > 0 for r in result)


def test_lsuv_on_a_cnn_and_the_training_flag():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
        nn.Dropout(0.5),
    )
    model.train()
    result = I.lsuv_(model, torch.randn(64, 3, 8, 8), tol=0.1)
    assert model.training and len(result) == 3
    assert all(abs(r.std - 1) < 0.1 for r in result)


def test_lsuv_errors():
    with pytest.raises(ValueError, match="no Linear or Conv layer"):
        I.lsuv_(nn.Sequential(nn.ReLU()), torch.randn(4, 3))
    with pytest.raises(ValueError, match="tol must be > 0"):
        I.lsuv_(_mlp(), torch.randn(4, 64), tol=0)
