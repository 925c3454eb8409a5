"""Every surgery transform on random small models: the input model is never changed,
everything the report does not list as changed is exactly as it was (class, flags, options,
the very parameter tensors with their values, requires_grad and ties, buffers), what the
transform promises of the changed layers holds (same computation for the swaps, eval-mode
behaviour for a freeze, exact statistics for precise_bn, the same eval outputs for a fold),
and every normalization layer in the transform's scope is either changed or skipped once,
with a reason — and nothing but normalization layers is ever skipped.

The models mix torch.nn's, normlab's and timm's norm layers with random options, tied
modules (one layer called twice), tied parameters (a conv's or a norm's weight held by two
modules), requires_grad=False on some parameters, frozen layers, masks, residual adds and
containers named like norms. The budget is the Hypothesis profile's (tests/conftest.py):
derandomized in CI; NORMLAB_HYPOTHESIS=dev draws more.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from helpers import import_timm
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import normlab as nl
from normlab import surgery

timm = import_timm()

C, H, W, N = 4, 3, 4, 6  # W == C, so a LayerNorm over W can share a weight with a channel norm
DTYPE = torch.float64
TOL = 1e-9

FROZEN_BN = (nl.nn.FrozenBatchNorm1d, nl.nn.FrozenBatchNorm2d, nl.nn.FrozenBatchNorm3d)
TIMM_NORMS = (timm.layers.BatchNormAct2d,) if timm else ()

# Every kind a block's norm can be: the class it builds and whether its forward takes mask=.
KINDS = {
    "torch_bn": False,
    "nl_bn": True,
    "nl_bnact": True,
    "nl_renorm": False,
    "nl_frozen": False,
    "torch_sync": False,
    "nl_sync": True,
    "torch_gn": False,
    "nl_gn": True,
    "torch_in": False,
    "nl_in": True,
    "torch_ln": False,
    "nl_ln2d": False,
    "torch_lrn": False,
} | ({"timm_bnact": False} if timm else {})


@dataclass
class NormSpec:
    kind: str
    affine: bool
    bias: bool
    track: bool
    momentum: float | None
    eps: float
    unbiased: bool
    on_nonfinite: str
    frozen: str | None  # None, "statistics" (affine=False) or "all"
    no_grad: tuple[str, ...]  # parameters with requires_grad=False
    masked: bool
    hooked: bool = False  # a forward hook that rescales the output: it must run wherever the layer goes


@dataclass
class BlockSpec:
    conv: bool
    conv_bias: bool
    norm: NormSpec
    act: bool
    residual: bool
    same_norm_as: int | None = None  # reuse an earlier block's norm module: one layer, two calls
    norm_weight_from: int | None = None  # hold an earlier norm's weight: tied parameters
    conv_weight_from: int | None = None  # hold an earlier conv's weight
    conv_no_grad: bool = False
    norm_eval: bool = False  # the usual recipe: this norm put in eval mode inside a training model


@dataclass
class ModelSpec:
    blocks: list[BlockSpec]
    seed: int
    training: bool = True


@st.composite
def norm_specs(draw):
    kind = draw(st.sampled_from(list(KINDS)))
    frozen = (
        draw(st.sampled_from([None, None, "statistics", "all"]))
        if kind.startswith("nl_") and kind != "nl_frozen"
        else None
    )
    return NormSpec(
        kind=kind,
        affine=draw(st.booleans()) if kind not in ("nl_frozen", "torch_lrn") else False,
        bias=draw(st.sampled_from([True, True, False])),
        track=draw(st.sampled_from([True, True, False])),
        momentum=draw(st.sampled_from([0.1, 0.3, None])),
        eps=draw(st.sampled_from([1e-5, 1e-3])),
        unbiased=draw(st.sampled_from([True, True, False])),
        on_nonfinite=draw(st.sampled_from(["skip", "skip", "raise"])),
        frozen=frozen,
        no_grad=draw(st.sampled_from([(), (), ("weight",), ("bias",), ("weight", "bias")])),
        masked=KINDS[kind] and draw(st.booleans()),
        hooked=draw(st.sampled_from([False, False, False, True])),
    )


@st.composite
def model_specs(draw):
    count = draw(st.integers(1, 4))
    blocks = []
    for i in range(count):
        earlier = st.sampled_from([None, None] + list(range(i))) if i else st.just(None)
        blocks.append(
            BlockSpec(
                conv=draw(st.sampled_from([True, True, True, False])),
                conv_bias=draw(st.booleans()),
                norm=draw(norm_specs()),
                act=draw(st.booleans()),
                residual=draw(st.booleans()),
                same_norm_as=draw(earlier),
                norm_weight_from=draw(earlier),
                conv_weight_from=draw(earlier),
                conv_no_grad=draw(st.sampled_from([False, False, True])),
                norm_eval=draw(st.sampled_from([False, False, False, True])),
            )
        )
    return ModelSpec(blocks, seed=draw(st.integers(0, 2**31 - 1)), training=draw(st.sampled_from([True, True, False])))


class NormBlock(nn.Module):
    """conv (optional) → norm (with the mask, optionally) → ReLU (optional), plus a
    residual add. A container named like a norm: it must never be reported as one."""

    def __init__(self, spec: BlockSpec, norm: nn.Module, masked: bool):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1, bias=spec.conv_bias, dtype=DTYPE) if spec.conv else None
        self.norm = norm
        self.masked, self.act, self.residual = masked, spec.act, spec.residual

    def forward(self, x, mask):
        y = self.conv(x) if self.conv is not None else x
        y = self.norm(y, mask=mask) if self.masked else self.norm(y)
        if self.act:
            y = torch.relu(y)
        return x + y if self.residual else y


class Net(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, mask):
        for block in self.blocks:
            x = block(x, mask)
        return x


def _make_norm(s: NormSpec) -> nn.Module:
    f = {"dtype": DTYPE}
    nl_opts = {"unbiased_running_var": s.unbiased, "on_nonfinite": s.on_nonfinite}
    bn_args = (C, s.eps, s.momentum, s.affine, s.track)
    kind = s.kind
    if kind == "torch_bn":
        return nn.BatchNorm2d(*bn_args, bias=s.bias, **f)
    if kind == "nl_bn":
        return nl.nn.BatchNorm2d(*bn_args, bias=s.bias, **nl_opts, **f)
    if kind == "nl_bnact":
        return nl.nn.BatchNormAct2d(
            *bn_args, bias=s.bias, activation="leaky_relu", activation_param=0.1, **nl_opts, **f
        )
    if kind == "nl_renorm":
        return nl.nn.BatchRenorm2d(C, s.eps, s.momentum, s.affine, bias=s.bias, **nl_opts, **f)
    if kind == "nl_frozen":
        return nl.nn.FrozenBatchNorm2d(C, s.eps, **f)
    if kind == "torch_sync":
        return nn.SyncBatchNorm(*bn_args, bias=s.bias, **f)
    if kind == "nl_sync":
        return nl.nn.SyncBatchNorm(*bn_args, bias=s.bias, **nl_opts, **f)
    if kind == "torch_gn":
        return nn.GroupNorm(2, C, s.eps, s.affine, bias=s.bias, **f)
    if kind == "nl_gn":
        return nl.nn.GroupNorm(2, C, s.eps, s.affine, bias=s.bias, **f)
    if kind == "torch_in":
        return nn.InstanceNorm2d(C, s.eps, s.momentum or 0.1, s.affine, s.track, bias=s.bias, **f)
    if kind == "nl_in":
        return nl.nn.InstanceNorm2d(C, s.eps, s.momentum, s.affine, s.track, bias=s.bias, **nl_opts, **f)
    if kind == "torch_ln":
        return nn.LayerNorm(W, s.eps, s.affine, bias=s.bias, **f)
    if kind == "nl_ln2d":
        return nl.nn.LayerNorm2d(C, s.eps, s.affine, s.bias, **f)
    if kind == "torch_lrn":
        return nn.LocalResponseNorm(2)
    if kind == "timm_bnact":
        return timm.layers.BatchNormAct2d(C, s.eps, s.momentum or 0.1, s.affine, s.track, act_layer=nn.ReLU, **f)
    raise AssertionError(kind)


def build(spec: ModelSpec) -> Net:
    torch.manual_seed(spec.seed)
    g = torch.Generator().manual_seed(spec.seed)
    blocks, norm_specs = [], []  # norm_specs[i]: the spec of the layer block i calls
    for b in spec.blocks:
        if b.same_norm_as is None:
            norm_specs.append(b.norm)
            blocks.append(NormBlock(b, _make_norm(b.norm), b.norm.masked))
        else:  # the same layer, called again, as its own spec says (with a mask or not)
            norm_specs.append(norm_specs[b.same_norm_as])
            blocks.append(NormBlock(b, blocks[b.same_norm_as].norm, norm_specs[-1].masked))
    with torch.no_grad():
        for block in blocks:
            norm = block.norm
            if isinstance(getattr(norm, "weight", None), torch.Tensor):
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=g, dtype=DTYPE) + 0.5)
            if isinstance(getattr(norm, "bias", None), torch.Tensor):
                norm.bias.copy_(torch.randn(norm.bias.shape, generator=g, dtype=DTYPE) * 0.3)
            if getattr(norm, "running_mean", None) is not None:
                norm.running_mean.copy_(torch.randn(norm.running_mean.shape, generator=g, dtype=DTYPE) * 0.5)
                norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=g, dtype=DTYPE) + 0.5)
    for b, block in zip(spec.blocks, blocks):
        source = blocks[b.conv_weight_from].conv if b.conv_weight_from is not None else None
        if block.conv is not None and source is not None and source is not block.conv:
            block.conv.weight = source.weight
        if block.conv is not None and b.conv_no_grad:
            block.conv.weight.requires_grad_(False)
        donor = blocks[b.norm_weight_from].norm if b.norm_weight_from is not None else None
        mine = getattr(block.norm, "weight", None)
        theirs = getattr(donor, "weight", None)
        if (
            isinstance(mine, nn.Parameter)
            and isinstance(theirs, nn.Parameter)
            and mine.shape == theirs.shape
            and donor is not block.norm
        ):
            block.norm.weight = theirs
    for s, block in zip(norm_specs, blocks):  # after the ties: a flag set on a tied weight holds for both
        for name in s.no_grad:
            p = getattr(block.norm, name, None)
            if isinstance(p, nn.Parameter):
                p.requires_grad_(False)
        if s.frozen and not getattr(block.norm, "frozen", False):
            block.norm.freeze(affine=s.frozen == "all")
        if s.hooked and not block.norm._forward_hooks:
            block.norm.register_forward_hook(_rescale)
    net = Net(blocks).train(spec.training)
    for b, block in zip(spec.blocks, blocks):
        if b.norm_eval:
            block.norm.eval()
    return net


def _rescale(module, args, output):
    return output * 1.5 - 0.25


def inputs(seed: int, n: int = N):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, C, H, W, generator=g, dtype=DTYPE) * 1.5 + 0.5
    mask = torch.rand(n, H, W, generator=g) > 0.4
    mask[0] = True  # at least H·W valid positions per channel
    return x, mask


# --- what the checks look at ------------------------------------------------------------------


def is_norm(module: nn.Module) -> bool:
    """The test's own list of what a normalization layer is (not surgery's)."""
    return isinstance(module, nl.nn.NORM_LAYERS + TIMM_NORMS)


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm,) + FROZEN_BN)


def snapshot(model: nn.Module) -> list:
    """Everything about a model a transform must not touch: per registered path, the class,
    flags, options, and every parameter and buffer (value, requires_grad, identity)."""
    ids: dict[int, int] = {}  # tensor identity → first-seen index: the tie structure
    rows = []
    for path, m in model.named_modules(remove_duplicate=False):
        tensors = []
        for kind, slots in (("p", m._parameters), ("b", m._buffers)):
            for name, t in slots.items():
                if t is None:
                    tensors.append((kind, name, None))
                    continue
                tensors.append(
                    (kind, name, ids.setdefault(id(t), len(ids)), t.detach().clone(), t.requires_grad, t.dtype)
                )
        flags = (
            m.training,
            getattr(m, "frozen", None),
            getattr(m, "frozen_affine", None),
            dict(getattr(m, "_requires_grad_before_freeze", {}) or {}),
            list(m._forward_hooks.values()),
        )
        markers = sorted(k for k in m.__dict__ if k.startswith("_normlab_"))
        rows.append((path, type(m), flags, markers, repr(m) if not list(m.children()) else "", tensors))
    return rows


def assert_same_snapshot(a: list, b: list, where: str = "") -> None:
    assert len(a) == len(b), where
    for ra, rb in zip(a, b):
        assert ra[:5] == rb[:5], f"{where}: {ra[:5]} != {rb[:5]}"
        assert len(ra[5]) == len(rb[5]), f"{where}: {ra[0]}"
        for ta, tb in zip(ra[5], rb[5]):
            assert ta[:3] == tb[:3], f"{where}: {ra[0]} {ta[:3]} != {tb[:3]}"
            if ta[2] is not None:
                assert torch.equal(ta[3], tb[3]) and ta[4:] == tb[4:], f"{where}: {ra[0]}.{ta[1]}"


def own_state(m: nn.Module) -> dict:
    """A module's own parameters and buffers: name → (value, requires_grad)."""
    out = {}
    for kind, slots in (("p", m._parameters), ("b", m._buffers)):
        for name, t in slots.items():
            out[kind + name] = None if t is None else (t.detach().clone(), t.requires_grad)
    return out


def tie_groups(model: nn.Module, keys: set[str]) -> set[frozenset[str]]:
    """The groups of 'path.name' parameter keys (among ``keys``) that are one tensor."""
    groups: dict[int, set[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        for name, p in m._parameters.items():
            key = f"{path}.{name}" if path else name
            if p is not None and key in keys:
                groups.setdefault(id(p), set()).add(key)
    return {frozenset(g) for g in groups.values()}


def param_keys(model: nn.Module) -> set[str]:
    return {
        f"{path}.{name}" if path else name
        for path, m in model.named_modules(remove_duplicate=False)
        for name, p in m._parameters.items()
        if p is not None
    }


def train_step(model: nn.Module, x, mask, grad_seed: int, eval_paths=()):
    """One training forward and backward (the layers at ``eval_paths`` in eval mode): the
    output, the input's gradient, every parameter's gradient (by key) and every buffer after."""
    model.train()
    for path in eval_paths:
        model.get_submodule(path).eval()
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    out = model(xi, mask)
    g = torch.Generator().manual_seed(grad_seed)
    out.backward(torch.randn(out.shape, generator=g, dtype=out.dtype))
    grads = {}
    for path, m in model.named_modules(remove_duplicate=False):
        for name, p in m._parameters.items():
            if p is not None:
                grads[f"{path}.{name}"] = None if p.grad is None else p.grad.clone()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    return out.detach(), xi.grad, grads, buffers


def assert_close_steps(ours, reference, where: str, skip_buffers: set[str] = frozenset()) -> None:
    torch.testing.assert_close(ours[0], reference[0], rtol=TOL, atol=TOL, msg=lambda m: f"{where} output: {m}")
    torch.testing.assert_close(ours[1], reference[1], rtol=TOL, atol=TOL, msg=lambda m: f"{where} dx: {m}")
    assert ours[2].keys() == reference[2].keys(), where
    for k, g in reference[2].items():
        if g is None or ours[2][k] is None:
            assert g is None and ours[2][k] is None, f"{where}: gradient of {k}"
        else:
            torch.testing.assert_close(ours[2][k], g, rtol=TOL, atol=TOL, msg=lambda m, k=k: f"{where} grad {k}: {m}")
    assert ours[3].keys() == reference[3].keys(), where
    for k, v in reference[3].items():
        if k not in skip_buffers:
            torch.testing.assert_close(ours[3][k], v, rtol=TOL, atol=TOL, msg=lambda m, k=k: f"{where} {k}: {m}")


def eval_output(model: nn.Module, x, mask):
    model.eval()
    with torch.no_grad():
        return model(x, mask)


# --- the transforms, and what each promises ---------------------------------------------------

TRANSFORMS = {
    "fold_batchnorm": lambda m, ex: surgery.fold_batchnorm(m, example_input=ex),
    "freeze_norms": lambda m, ex: surgery.freeze_norms(m),
    "freeze_norms(affine=False)": lambda m, ex: surgery.freeze_norms(m, affine=False),
    "unfreeze_norms": lambda m, ex: surgery.unfreeze_norms(m),
    "from_torch": lambda m, ex: surgery.from_torch(m),
    "to_torch": lambda m, ex: surgery.to_torch(m),
    "convert_sync_batchnorm": lambda m, ex: surgery.convert_sync_batchnorm(m),
    "revert_sync_batchnorm": lambda m, ex: surgery.revert_sync_batchnorm(surgery.convert_sync_batchnorm(m).model),
    "precise_bn": lambda m, ex: surgery.precise_bn(
        m, [ex, inputs(7, n=5)], forward_fn=lambda model, batch: model(*batch)
    ),
} | {
    f"convert_norms({to})": (lambda m, ex, to=to: surgery.convert_norms(m, to, example_input=ex))
    for to in surgery.TARGETS
}

#: which normalization layers each transform is about: each must end up changed or skipped
SCOPE = {
    "fold_batchnorm": is_batchnorm,
    "freeze_norms": is_norm,
    "freeze_norms(affine=False)": is_norm,
    "unfreeze_norms": lambda m: getattr(m, "frozen", False) or isinstance(m, FROZEN_BN),
    "from_torch": lambda m: is_norm(m) and not type(m).__module__.startswith("normlab."),
    "to_torch": lambda m: is_norm(m) and type(m).__module__.startswith("normlab."),
    "convert_sync_batchnorm": lambda m: is_batchnorm(m) and not isinstance(m, nl.nn.SyncBatchNorm),
    "revert_sync_batchnorm": lambda m: False,  # its input is convert_sync's output: checked apart
    "precise_bn": lambda m: (
        (is_batchnorm(m) and not isinstance(m, FROZEN_BN)) or getattr(m, "running_mean", None) is not None
    ),
} | {f"convert_norms({to})": is_norm for to in surgery.TARGETS}

SWAPS = ("from_torch", "to_torch", "convert_sync_batchnorm", "revert_sync_batchnorm")

CASES: dict[str, int] = {}  # transform → examples run


@pytest.fixture(scope="module", autouse=True)
def _count_cases():
    """Say how many models each transform was tried on (shown with pytest -s)."""
    yield
    total = sum(CASES.values())
    print(f"\nsurgery properties: {total} transform runs on random models: {CASES}")


def aliases(model: nn.Module, path: str) -> list[str]:
    """Every path the module at ``path`` is registered under."""
    target = model.get_submodule(path)
    return [p for p, m in model.named_modules(remove_duplicate=False) if m is target]


def conventions_apart(model: nn.Module, changed: list[str]) -> set[str]:
    """State-dict keys where torch.nn's and normlab's layers differ by a documented convention
    (docs/conventions.md): torch.nn's InstanceNorm does not count batches nor honour
    momentum=None; torch.nn stores the unbiased running variance."""
    keys = set()
    for path in changed:
        layer = model.get_submodule(path)
        for alias in aliases(model, path):
            if isinstance(layer, nn.modules.instancenorm._InstanceNorm):
                keys.add(f"{alias}.num_batches_tracked")
                if layer.momentum is None:
                    keys |= {f"{alias}.running_mean", f"{alias}.running_var"}
            if getattr(layer, "unbiased_running_var", True) is False:
                keys.add(f"{alias}.running_var")
    return keys


def independent_statistics(model: nn.Module, paths: list[str], batches) -> dict[str, tuple]:
    """Each listed BatchNorm's input over the batches — its valid positions where it is called
    with a mask — with only those layers in train mode, as float64 (mean, biased var, unbiased
    var); computed without precise_bn."""
    reference = copy.deepcopy(model).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for path in paths:
        layer = reference.get_submodule(path)
        layer.train()

        def hook(module, args, kwargs, path=path):
            x, mask = args[0], kwargs.get("mask")
            values = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, N·H·W)
            if mask is not None:
                values = values[:, mask.expand(x.shape[0], *x.shape[2:]).reshape(-1)]
            seen.setdefault(path, []).append(values.double())

        hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        for batch in batches:
            reference(*batch)
    for h in hooks:
        h.remove()
    out = {}
    for path, parts in seen.items():
        values = torch.cat(parts, dim=1)
        out[path] = (values.mean(1), values.var(1, correction=0), values.var(1, correction=1))
    return out


def check_transform(name: str, spec: ModelSpec) -> None:
    model = build(spec)
    x, mask = inputs(spec.seed)
    example = (x, mask)
    before = snapshot(model)
    new, report = TRANSFORMS[name](model, example)
    CASES[name] = CASES.get(name, 0) + 1

    # 1. the input model is exactly as it was
    assert_same_snapshot(snapshot(model), before, f"{name}: input model modified")

    # 2. the report: each path once, reasons given, only normalization layers skipped
    modules = dict(model.named_modules())
    changed = [c.path for c in report.changes]
    skipped = [s.path for s in report.skipped]
    assert len(set(changed)) == len(changed) and len(set(skipped)) == len(skipped), report
    assert not set(changed) & set(skipped), report
    for s in report.skipped:
        assert s.reason and is_norm(modules[s.path]), f"{name}: skipped {s.path} ({type(modules[s.path])})"
    scope = {p for p, m in modules.items() if SCOPE[name](m)}
    missing = scope - set(changed) - set(skipped)
    assert not missing, f"{name}: neither changed nor skipped: {missing}\n{report}"

    # 3. everything not listed as changed is exactly as it was
    affected = set(changed) | {c.detail["into"] for c in report.changes if "into" in c.detail}
    affected |= {p for c in report.changes for p in c.detail.get("shared_with", [])}  # tied γ/β, said so
    affected = {alias for p in affected for alias in aliases(model, p)}  # a tied layer: every name
    new_modules = dict(new.named_modules(remove_duplicate=False))
    for path, m in model.named_modules(remove_duplicate=False):
        if path in affected or any(path.startswith(a + ".") for a in affected if a) or "" in affected:
            continue
        n_m = new_modules.get(path)
        assert n_m is not None and type(n_m) is type(m), f"{name}: {path} is {type(n_m)}, was {type(m)}"
        if name != "fold_batchnorm":  # folding returns an eval-mode model
            assert n_m.training == m.training, f"{name}: {path}.training"
        if not list(m.children()):
            assert repr(n_m) == repr(m), f"{name}: {path}: {n_m!r} != {m!r}"
        mine, theirs = own_state(n_m), own_state(m)
        assert mine.keys() == theirs.keys(), f"{name}: {path}"
        for k, v in theirs.items():
            if v is None:
                assert mine[k] is None
            else:
                assert torch.equal(mine[k][0], v[0]) and mine[k][1] == v[1], f"{name}: {path} {k}"
        assert getattr(n_m, "frozen", None) == getattr(m, "frozen", None), f"{name}: {path}.frozen"
    if name != "fold_batchnorm":  # folding adds biases and removes BatchNorms: ties checked there
        keys = param_keys(model) & param_keys(new)
        assert tie_groups(new, keys) == tie_groups(model, keys), f"{name}: tied parameters changed"

    # 4. what the transform promises of what it changed: a replaced layer keeps its hooks
    if name != "fold_batchnorm":
        for path in changed:
            layer = new.get_submodule(path)
            layer = layer[0] if isinstance(layer, nn.Sequential) else layer
            assert list(layer._forward_hooks.values()) == list(modules[path]._forward_hooks.values()), path
    if name in SWAPS:
        # the same computation: a training step and eval agree, requires_grad as before
        for p_key in param_keys(model) & param_keys(new):
            assert new.get_parameter(p_key).requires_grad == model.get_parameter(p_key).requires_grad, p_key
        evaluated = eval_output(copy.deepcopy(new), x, mask)  # before a step: its updates may differ
        torch.testing.assert_close(evaluated, eval_output(copy.deepcopy(model), x, mask), rtol=TOL, atol=TOL)
        ours = train_step(new, x, mask, spec.seed)
        theirs = train_step(copy.deepcopy(model), x, mask, spec.seed)
        apart = conventions_apart(model, changed) | conventions_apart(new, changed)
        assert_close_steps(ours, theirs, name, apart)
    elif name.startswith("freeze_norms"):
        affine = name == "freeze_norms"
        for path in changed:
            layer = new.get_submodule(path)
            assert layer.frozen, f"{name}: {path}"
            for p_name, p in layer.named_parameters(recurse=False):
                was = modules[path].get_parameter(p_name).requires_grad
                assert p.requires_grad == (was and not affine), f"{name}: {path}.{p_name}"
        # a frozen layer computes in train mode what it computed in eval mode
        ours = train_step(new, x, mask, spec.seed)
        theirs = train_step(copy.deepcopy(model), x, mask, spec.seed, eval_paths=changed)
        for key, g in list(ours[2].items()):  # γ/β frozen: no gradient here, one in the reference
            if g is None and not new.get_parameter(key).requires_grad:
                theirs[2][key] = None
        assert_close_steps(ours, theirs, name)
    elif name == "unfreeze_norms":
        reference = copy.deepcopy(model)
        for path in changed:  # requires_grad restored only where a freeze with affine set it
            layer = reference.get_submodule(path)
            if layer.frozen_affine:
                layer.unfreeze()
            else:
                layer.frozen = False
        for path in changed:
            layer = new.get_submodule(path)
            assert not getattr(layer, "frozen", False)
            for p_name, p in layer.named_parameters(recurse=False):
                assert p.requires_grad == reference.get_submodule(path).get_parameter(p_name).requires_grad
        assert_close_steps(train_step(new, x, mask, spec.seed), train_step(reference, x, mask, spec.seed), name)
    elif name == "fold_batchnorm":
        assert not new.training
        torch.testing.assert_close(eval_output(new, x, mask), eval_output(copy.deepcopy(model), x, mask))
        assert report.max_abs_diff is not None and report.max_abs_diff < TOL
    elif name == "precise_bn":
        batches = [example, inputs(7, n=5)]
        exact = independent_statistics(model, changed, batches)
        for path in changed:
            layer, old = new.get_submodule(path), modules[path]
            mean, biased, unbiased = exact[path]
            var = unbiased if getattr(old, "unbiased_running_var", True) else biased
            torch.testing.assert_close(layer.running_mean, mean, rtol=TOL, atol=TOL)
            torch.testing.assert_close(layer.running_var, var, rtol=TOL, atol=TOL)
            rest = {k: v for k, v in old.state_dict().items() if k not in ("running_mean", "running_var")}
            assert all(torch.equal(layer.state_dict()[k], v) for k, v in rest.items()), path
    elif name.startswith("convert_norms"):
        for path in changed:  # γ/β (where the target has them) are the same tensors: requires_grad kept
            layer = new.get_submodule(path)
            layer = layer[0] if isinstance(layer, nn.Sequential) else layer
            for p_name in ("weight", "bias"):
                old_p, new_p = getattr(modules[path], p_name, None), layer._parameters.get(p_name)
                if isinstance(old_p, nn.Parameter) and new_p is not None:
                    assert new_p is not None and new_p.requires_grad == old_p.requires_grad, f"{path}.{p_name}"
        if report.max_abs_diff is not None:
            assert report.max_abs_diff < TOL, report
        new(x, mask)  # still runs on the model's inputs, masks included
        new.train()
        new(x, mask)


@pytest.mark.parametrize("name", list(TRANSFORMS))
@given(spec=model_specs())
def test_transform_on_random_models(name, spec):
    check_transform(name, spec)


@given(spec=model_specs())
def test_round_trips_give_the_model_back(spec):
    """convert_sync → revert_sync, and freeze → unfreeze on a model with nothing frozen, give
    the input model back: the same classes, flags, options, values and requires_grad, ties
    included."""
    model = build(spec)
    chains = [(surgery.convert_sync_batchnorm, surgery.revert_sync_batchnorm)]
    if not any(getattr(m, "frozen", False) for m in model.modules()):
        chains += [
            (surgery.freeze_norms, surgery.unfreeze_norms),
            (lambda m: surgery.freeze_norms(m, affine=False), surgery.unfreeze_norms),
        ]
    for chain in chains:
        new = model
        for step in chain:
            new = step(new).model
        assert_same_snapshot(snapshot(new), snapshot(model), "round trip")
