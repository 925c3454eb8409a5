"""How much Python an eager call passes through, counted with ``sys.setprofile`` (frames are
deterministic, unlike time): a module's training call goes module → family entry → path
rule → one call into the kernels' C++ entry that does the whole work (checks, kernel,
running update, autograd node), as torch.nn's goes module → functional → ATen. The rule asks
the compiled module one question on the way (``plain_eager``: the tensor and the
dispatcher's state, read in C). Module.__call__ and Module.__getattr__ (parameter and buffer
reads) are torch's, paid by torch.nn's layers too, and not counted."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

import normlab as nl
from normlab import core

_NOT_EXPECTED = (
    "the composed ops were asked for"
    if core.backend() == "composed"
    else (None if shutil.which(os.environ.get("CXX", "c++")) else "no C++ compiler here")
)
pytestmark = pytest.mark.skipif(_NOT_EXPECTED is not None, reason=_NOT_EXPECTED or "")

_MODULE_MACHINERY = {"_wrapped_call_impl", "_call_impl", "__getattr__"}


def _profile(call):
    """(python frames, normlab frames, crossings into the kernels) of one call, after two
    warm-up calls; frames under the module's own __call__ machinery only."""
    call()
    call()
    events = []

    def record(frame, event, arg):
        if event == "call":
            events.append(("python", frame.f_code.co_filename, frame.f_code.co_name))
        elif event == "c_call":
            events.append(("c", getattr(arg, "__module__", "") or "", getattr(arg, "__name__", "")))

    sys.setprofile(record)
    try:
        call()
    finally:
        sys.setprofile(None)
    python = [
        e
        for e in events
        if e[0] == "python"
        and e[1] != __file__
        and not (e[1].endswith(os.path.join("torch", "nn", "modules", "module.py")) and e[2] in _MODULE_MACHINERY)
    ]
    ours = [e for e in python if os.sep + "normlab" + os.sep in e[1]]
    compiled = [e[2] for e in events if e[0] == "c" and e[1].startswith("normlab_kernels")]
    return python, ours, compiled


_X = torch.randn(2, 4, 3, 3)


@pytest.mark.parametrize(
    "make,budget",
    [
        (lambda: nl.nn.BatchNorm2d(4), 4),  # torch.nn's: 5 in training, 4 in eval
        (lambda: nl.nn.BatchNormAct2d(4), 4),
        (lambda: nl.nn.GroupNorm(2, 4), 4),
        (lambda: nl.nn.LayerNorm(3), 4),
        (lambda: nl.nn.RMSNorm(3), 4),
    ],
    ids=["BatchNorm2d", "BatchNormAct2d", "GroupNorm", "LayerNorm", "RMSNorm"],
)
def test_a_training_call_is_a_few_frames_and_one_crossing(make, budget):
    layer = make().train()
    python, ours, compiled = _profile(lambda: layer(_X))
    names = [e[2] for e in python]
    assert len(python) <= budget, names  # everything, torch's own helpers included
    assert len(ours) <= 5, names
    # one call that runs the normalization, and the rule's one question
    assert sorted(compiled) in (["channel_norm", "plain_eager"], ["plain_eager", "row_norm"]), compiled
    assert not any("property" in name or name in ("eps", "momentum", "on_nonfinite") for name in names), names


@pytest.mark.parametrize(
    "make,budget",
    [(lambda: nl.nn.GroupNorm(2, 4), 4), (lambda: nl.nn.BatchNorm2d(4), 5)],
    ids=["GroupNorm", "BatchNorm2d"],
)
def test_a_masked_training_call_takes_the_same_route_and_one_crossing(make, budget):
    """A mask changes nothing in the route: the masked entry does the checks, the kernel, the
    running update and the autograd node in its one crossing."""
    layer = make().train()
    mask = torch.ones(2, 3, 3, dtype=torch.bool)
    mask[0, 2] = False
    python, ours, compiled = _profile(lambda: layer(_X, mask=mask))
    assert len(python) <= budget, [e[2] for e in python]
    assert sorted(compiled) == ["masked_channel_norm", "plain_eager"], compiled


def test_the_counter_sees_a_slow_path():
    """The count is not vacuous: a float64 call (native path, checks in Python) passes more."""
    layer = nl.nn.BatchNorm2d(4, dtype=torch.float64)
    python, ours, compiled = _profile(lambda: layer(_X.double()))
    assert len(ours) > 5 and compiled == ["plain_eager"]
