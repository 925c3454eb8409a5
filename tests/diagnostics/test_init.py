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


# --- gains: every name torch's calculate_gain takes; arguments that would be ignored -------


@pytest.mark.parametrize(
    "name",
    [
        "linear",
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "sigmoid",
        "tanh",
        "relu",
        "leaky_relu",
        "selu",
    ],
)
def test_torch_convention_takes_every_name_calculate_gain_takes(name):
    assert I.gain(name, convention="torch") == pytest.approx(nn.init.calculate_gain(name))
    assert I.gain(name) == pytest.approx(I.gain(name, convention="glorot"))  # and the default takes it too


def test_activation_none_means_no_activation():
    assert I.gain(None) == 1.0
    w = I.orthogonal_(torch.empty(30, 50), activation=None)
    torch.testing.assert_close(w @ w.T, torch.eye(30), rtol=1e-5, atol=1e-5)  # gain 1
    w = I.xavier_normal_(_big(), activation=None)
    assert w.std().item() == pytest.approx(math.sqrt(2 / 900), rel=0.01)
    with pytest.raises(TypeError, match="activation must be a name"):
        I.gain(nn.ReLU())


def test_a_negative_slope_is_never_silently_ignored():
    w = torch.empty(20, 10)
    with pytest.raises(ValueError, match="applies to 'leaky_relu' only; 'relu' takes none"):
        I.he_normal_(w, activation="relu", negative_slope=0.2)
    with pytest.raises(ValueError, match="applies to 'leaky_relu' only"):
        I.orthogonal_(w, negative_slope=0.2)  # activation "linear"
    with pytest.raises(ValueError, match="would be ignored with an explicit gain"):
        I.xavier_uniform_(w, activation="leaky_relu", gain=2.0, negative_slope=0.2)
    with pytest.raises(TypeError, match="must be a number"):
        I.gain("leaky_relu", True)
    assert I.he_normal_(_big(), activation="leaky_relu", negative_slope=0.3).std().item() == pytest.approx(
        math.sqrt(2 / 1.09 / 500), rel=0.01
    )


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 3, 3, 3)])
@pytest.mark.parametrize(
    "fn", [I.orthogonal_, I.xavier_uniform_, I.xavier_normal_, I.he_uniform_, I.he_normal_, I.lecun_normal_]
)
def test_zero_element_weights_are_a_no_op_like_torchs(fn, shape):
    w = torch.empty(shape)
    with pytest.warns(UserWarning, match="zero-element"):
        assert fn(w) is w
    with pytest.raises(ValueError, match="unknown activation"):  # arguments are still checked
        fn(torch.empty(shape), activation="swish")


@pytest.mark.parametrize(
    "fn", [I.orthogonal_, I.xavier_uniform_, I.xavier_normal_, I.he_uniform_, I.he_normal_, I.lecun_normal_]
)
def test_the_zero_element_warning_names_the_callers_line(fn):
    with pytest.warns(UserWarning, match="zero-element") as record:
        fn(torch.empty(0, 5))
    assert [w.filename for w in record] == [__file__]  # as torch's initializers do, not normlab's own file


# --- LSUV edge cases ---------------------------------------------------------------------------


class _Twice(nn.Module):
    """out(tanh(fc(tanh(fc(x))))): ``fc`` runs twice per forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


def _outputs_of(model, layer, batch):
    seen = []
    handle = layer.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    with torch.no_grad():
        model(batch)
    handle.remove()
    return seen


def test_lsuv_reports_every_call_of_a_layer_called_twice():
    torch.manual_seed(0)
    model, x = _Twice(), torch.randn(256, 16) * 4
    result = {r.name: r for r in I.lsuv_(model, x, tol=0.1)}
    first, second = _outputs_of(model, model.fc, x)
    fc = result["fc"]
    assert fc.call_stds == pytest.approx((first.std().item(), second.std().item()), rel=1e-5)
    assert fc.std == pytest.approx(torch.cat([first, second]).std().item(), rel=1e-5)  # what was rescaled
    assert fc.converged == all(abs(s - 1) < 0.1 for s in fc.call_stds)
    assert not fc.converged  # one scale cannot give both calls unit std here
    assert result["out"].converged and result["out"].call_stds == pytest.approx((result["out"].std,))


def test_lsuv_refuses_a_batch_too_small_for_a_std():
    with pytest.raises(ValueError, match=r"at least 2 output values of layer '0'.*gave 1"):
        I.lsuv_(nn.Sequential(nn.Linear(16, 1)), torch.randn(1, 16))
    result = I.lsuv_(nn.Sequential(nn.Linear(16, 8)), torch.randn(1, 16))  # 8 values: enough
    assert all(math.isfinite(r.std) for r in result)


def test_lsuv_with_a_mask_measures_valid_positions_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    lengths = torch.randint(2, 11, (32,))
    mask = torch.arange(10).unsqueeze(0) < lengths.unsqueeze(1)  # (batch, time)
    x = torch.randn(32, 10, 8) * 3 * mask.unsqueeze(-1)  # padding is 0
    result = I.lsuv_(model, x, tol=0.05, mask=mask)
    for r, layer in zip(result, (model[0], model[2])):
        (out,) = _outputs_of(model, layer, x)
        valid = out[mask]
        assert valid.std().item() == pytest.approx(1.0, abs=0.05) and r.std == pytest.approx(valid.std().item())
        assert abs(out.std().item() - 1.0) > 0.05  # over every position it is not: padding was left out
    with pytest.raises(ValueError, match="does not fit layer '0'"):
        I.lsuv_(model, x, mask=mask[:, :5])
    with pytest.raises(TypeError, match="bool tensor"):
        I.lsuv_(model, x, mask=mask.float())


def test_lsuv_masks_conv_outputs_without_their_channel_dim():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv1d(6, 6, 3, padding=1))
    mask = torch.arange(12).unsqueeze(0) < torch.randint(3, 13, (16,)).unsqueeze(1)  # (N, L)
    x = torch.randn(16, 4, 12) * 5 * mask.unsqueeze(1)
    result = I.lsuv_(model, x, tol=0.05, mask=mask)
    (out,) = _outputs_of(model, model[2], x)
    assert out.movedim(1, -1)[mask].std().item() == pytest.approx(1.0, abs=0.05) and result[-1].converged


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated:FutureWarning")
@pytest.mark.parametrize("style", ["parametrization", "hook"])
def test_lsuv_rescales_weight_norm_layers(style):
    torch.manual_seed(0)
    wrap = nn.utils.parametrizations.weight_norm if style == "parametrization" else nn.utils.weight_norm
    model = nn.Sequential(wrap(nn.Linear(16, 16)), nn.Tanh(), wrap(nn.Linear(16, 4)))
    x = torch.randn(256, 16) * 5
    result = I.lsuv_(model, x, tol=0.05)
    assert all(r.converged for r in result)
    for layer in (model[0], model[2]):
        (out,) = _outputs_of(model, layer, x)
        assert out.std().item() == pytest.approx(1.0, abs=0.05)  # the weight the layer computes with


def test_lsuv_says_when_a_parametrization_fixes_the_scale():
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(16, 16)), nn.Tanh(), nn.Linear(16, 4))
    with pytest.warns(RuntimeWarning, match="scaling the weight of '0' does not change its output"):
        result = I.lsuv_(model, torch.randn(256, 16) * 5, tol=0.05)
    assert not result[0].converged and result[0].scale == 1.0
    assert result[1].converged


class _Tied(nn.Module):
    """Two Linear layers holding one weight Parameter (tied, as embeddings and output
    projections are)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_lsuv_reports_what_tied_layers_output_at_the_end():
    """Rescaling ``b`` rescales ``a`` too: a result that says ``a`` has unit std while
    it outputs std 4 is a lie. Tied layers are one weight, rescaled once by the std of
    all their outputs, each call's std listed."""
    torch.manual_seed(0)
    model, x = _Tied(), torch.randn(256, 16) * 4
    result = {r.name: r for r in I.lsuv_(model, x, tol=0.1)}
    (a_out,) = _outputs_of(model, model.a, x)
    (b_out,) = _outputs_of(model, model.b, x)
    assert set(result) == {"a"}  # one weight, one entry, under the first layer's name
    assert result["a"].call_stds == pytest.approx((a_out.std().item(), b_out.std().item()), rel=1e-5)
    assert result["a"].converged == all(abs(s - 1) < 0.1 for s in result["a"].call_stds)


def test_lsuv_leaves_a_layer_it_cannot_rescale_as_it_was():
    """On an all-zero batch the first layer's output is its bias whatever its weight: the
    weight it was given back, the scale 1, and the warning names that cause too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.warns(RuntimeWarning, match="its input is 0"):
        result = I.lsuv_(model, torch.zeros(8, 16), generator=torch.Generator().manual_seed(0))
    reference = nn.Linear(16, 8)
    I.orthogonal_(reference.weight, generator=torch.Generator().manual_seed(0))
    assert result[0].scale == 1.0 and torch.equal(model[0].weight, reference.weight)


def test_lsuv_refuses_the_meta_device_with_a_reason():
    model = nn.Sequential(nn.Linear(16, 8)).to("meta")
    with pytest.raises(ValueError, match="meta device"):
        I.lsuv_(model, torch.randn(4, 16, device="meta"))


@pytest.mark.parametrize("init", [I.orthogonal_, I.xavier_uniform_, I.he_normal_, I.lecun_normal_])
def test_initializers_refuse_a_non_tensor_with_type_error(init):
    with pytest.raises(TypeError, match="expected a torch.Tensor weight, got list"):
        init([[1.0, 2.0], [3.0, 4.0]])
