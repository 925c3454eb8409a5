"""The path rule (normlab.core.paths.choose_path): each row of its table, the forced backends
and their fallbacks, the dispatch log — and that nothing else in normlab asks what the rule
asks (the tracing state), so the rule stays the one place a call's path is decided."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import normlab as nl
from normlab import core
from normlab.core import paths

SRC = Path(nl.__file__).resolve().parent
KERNELS = core.kernels_available() and core.backend() != "composed"
needs_kernels = pytest.mark.skipif(not KERNELS, reason="the kernels are not built here")


def _decide(x, *args, **kwargs):
    with core.record_dispatch() as log:
        decision = core.choose_path(x, *args, **kwargs)
    assert log == [(kwargs.get("operation", args[1] if len(args) > 1 else "norm"), decision.path, decision.reason)]
    return decision


@needs_kernels
def test_row_1_an_eager_float32_cpu_call_runs_the_kernels_directly():
    decision = _decide(torch.randn(2, 3, 4))
    assert decision is paths.KERNELS_DIRECT and decision == ("kernels", "direct", "")
    assert _decide(torch.randn(2, 3), paths.ROW, "layer_norm") is paths.KERNELS_DIRECT
    assert _decide(torch.nn.Parameter(torch.randn(2, 3))).path == "kernels"  # a parameter is a plain tensor


def test_a_mask_runs_the_masked_kernels_or_the_composed_ops_on_every_cpu_backend():
    x, mask = torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool)
    composed = ("composed", "eager", "mask: closed-form backward")
    for backend in paths.BACKENDS:
        if backend == "triton":  # the Triton kernels take masks (tests/kernels/test_triton_wiring.py)
            continue
        with core.use_backend(backend):
            takes = KERNELS and backend in ("auto", "kernels")
            assert _decide(x, mask=mask) == (paths.KERNELS_MASKED if takes else composed)
    # the masked kernels take eager float32 CPU channel norms in a layout they read, nothing else
    assert _decide(x.double(), mask=mask) == composed
    assert _decide(x.transpose(0, 2).contiguous().transpose(0, 2), mask=mask) == composed
    assert _decide(torch.randn(2, 4), paths.ROW, mask=torch.ones(2, 4, dtype=torch.bool)) == composed


def test_forced_composed_and_native():
    x = torch.randn(2, 3, 4)
    with core.use_backend("composed"):
        assert _decide(x) == ("composed", "eager", "backend forced to 'composed'")
        # torch's op decides what an empty input means (torch 2.14 refuses a GroupNorm with
        # no channels or no positions; 2.13 returns an empty output)
        assert _decide(torch.randn(2, 0, 4)) == ("native", "eager", "empty input")
    with core.use_backend("native"):
        assert _decide(x) == ("native", "eager", "backend forced to 'native'")
        # in place: torch has no in-place norm, so native falls to composed
        decision = _decide(x, inplace=True)
        assert decision.path == "composed" and decision.reason.endswith("in place: torch has no in-place norm")


@needs_kernels
def test_forced_kernels_fall_to_native_where_they_cannot_run():
    with core.use_backend("kernels"):
        assert _decide(torch.randn(2, 3)).path == "kernels"
        assert _decide(torch.randn(2, 3, dtype=torch.float64)) == (
            "native",
            "eager",
            "backend 'kernels' cannot take torch.float64 on cpu: native",
        )


def test_forcing_kernels_that_cannot_be_built_is_an_error(monkeypatch):
    build = core.kernels.cpu.build
    monkeypatch.setattr(build, "module", None)
    monkeypatch.setattr(build, "_state", {"path": None, "error": "no compiler", "tried": True})
    assert _decide(torch.randn(2, 3)) == ("composed", "eager", "kernels unavailable")
    with core.use_backend("kernels"), pytest.raises(RuntimeError, match="backend 'kernels' was forced"):
        core.choose_path(torch.randn(2, 3))


def test_empty_inputs_and_other_dtypes_and_devices_run_torch_s_ops():
    assert _decide(torch.randn(0, 3)) == ("native", "eager", "empty input")
    assert _decide(torch.randn(2, 3, dtype=torch.float64)) == ("native", "eager", "not float32 CPU")
    assert _decide(torch.randn(2, 3, dtype=torch.bfloat16)).path == "native"
    assert _decide(torch.empty(2, 3, device="meta")).path == "native"


def test_a_tracer_a_transform_and_a_subclass_see_torch_s_ops():
    seen = []

    def f(x):
        seen.append(core.choose_path(x))
        return x * 1

    torch.jit.trace(f, torch.randn(2, 3), check_trace=False)
    torch.func.vmap(f)(torch.randn(4, 2, 3))
    assert seen[0] == ("native", "export", "export/trace: torch's own norm ops")
    assert seen[1] == ("native", "eager", "torch.func transform or forward AD")

    class Tagged(torch.Tensor):
        pass

    decision = _decide(torch.randn(2, 3).as_subclass(Tagged))
    assert decision.path == "native" and "Tagged" in decision.reason
    with core.use_backend("composed"):  # the composed ops write in place, which a DTensor refuses
        assert _decide(torch.randn(2, 3).as_subclass(Tagged)) == decision
        assert _decide(torch.randn(2, 3)).path == "composed"


@needs_kernels
def test_float32_rows_for_layouts_the_kernels_do_not_read():
    nchw = torch.randn(2, 3, 4, 5)
    strided = nchw[:, :, :, ::2]
    assert _decide(strided, inplace=True) == ("composed", "eager", "in place on a layout the kernels do not read")
    assert _decide(strided).path == "kernels"  # out of place: made contiguous first
    assert _decide(strided, paths.ROW, centered=False) == ("native", "eager", "RMSNorm on a non-contiguous input")
    assert _decide(nchw, paths.CHANNELS_FIRST).path == "composed"


@needs_kernels
def test_a_mode_sees_the_registered_operator():
    class Nothing(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Nothing():
        decision = core.choose_path(torch.randn(2, 3))
    assert decision == ("kernels", "operator", "a mode sees the registered operator")


def test_a_gpu_backend_registered_does_not_take_cpu_calls():
    class Everything:
        def unavailable(self, x):
            return ""

        def takes(self, x, family, call, **kwargs):
            return True, ""

    before = core.choose_path(torch.randn(2, 3))
    paths.register_gpu_kernels(Everything())
    try:
        assert core.choose_path(torch.randn(2, 3)) == before
    finally:
        paths.register_gpu_kernels(None)


def test_a_gpu_backend_is_handed_each_family_call_whole():
    """The family entries pass a GPU backend one ChannelCall or RowCall holding the checked
    call (core/kernels/__init__.py's protocol); forced, the backend takes CPU tensors too."""
    from normlab.core.calls import ChannelCall, RowCall

    received = []

    class Recording:
        def unavailable(self, x):
            return ""

        def takes(self, x, family, call, **kwargs):
            return True, ""

        def channel_norm(self, call):
            received.append(call)
            return call.x

        def row_norm(self, call):
            received.append(call)
            return call.x if call.residual is None else (call.x, call.x + call.residual)

    paths.register_gpu_kernels(Recording())
    try:
        with core.use_backend("triton"):
            x, w = torch.randn(2, 4, 5), torch.randn(4)
            running = core.RunningStats.of(torch.zeros(4), torch.ones(4))
            mask = torch.ones(2, 5, dtype=torch.bool)
            core.channel_norm(x, w, None, groups=2, eps=1e-3, activation="leaky_relu", param=0.2, mask=mask)
            core.channel_norm(x, w, w, eps=1e-5, batch_stats=False, running=running)
            rows = torch.randn(3, 5)
            core.row_norm(rows, (5,), None, None, 1e-6, centered=False, residual=rows)
    finally:
        paths.register_gpu_kernels(None)
    grouped, given, row = received
    assert type(grouped) is ChannelCall and type(row) is RowCall
    assert (grouped.groups, grouped.eps, grouped.batch_stats, grouped.act[:2]) == (2, 1e-3, True, ("leaky_relu", 0.2))
    assert grouped.weight is w and grouped.bias is None and grouped.running is None and not grouped.inplace
    assert grouped.mask is not None and tuple(grouped.mask.shape) == (2, 5)
    assert given.batch_stats is False and given.running is running and given.groups == -1
    assert (row.normalized_shape, row.eps, row.centered, row.residual is rows) == ((5,), 1e-6, False, True)


def test_backends_names_and_the_old_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        core.set_backend("gpu")
    with core.use_backend("fast"):
        assert core.backend() == "kernels"
    assert core.backend() in paths.BACKENDS


def test_record_dispatch_names_every_layer_call():
    x = torch.randn(4, 3, 5)
    with core.record_dispatch() as log:
        nl.nn.BatchNorm1d(3)(x)
        nl.nn.BatchNormAct1d(3)(x)
        nl.nn.GroupNorm(1, 3)(x)
        nl.nn.LayerNorm(5)(x)
        nl.nn.InstanceNorm1d(3)(x)
        nl.functional.batch_norm(x.double(), None, None, training=True)
    assert [operation for operation, _, _ in log] == [
        "batch_norm",
        "batch_norm_act",
        "group_norm",
        "layer_norm",
        "instance_norm",
        "batch_norm",
    ]
    assert log[-1][1:] == ("native", "not float32 CPU")


# What the rule asks — is a tracer, an exporter, a transform or a mode active? — nobody else
# asks: a second place that did would be a second place that decides. (The kernels' module
# answers the first row's question in one C call, plain_eager, which only the rule calls.)
_TRACING_STATE = re.compile(
    r"is_exporting|jit\.is_tracing|_get_tracing_state|peek_interpreter_stack|forward_ad|is_dynamo_compiling"
    r"|TorchDispatchModeTLS|PythonTorchFunctionTLS|tracer::impl|_len_torch_dispatch_stack|_is_torch_function_mode"
)


def _without_plain_eager(text: str) -> str:
    """The C++ source without plain_eager's definition (the rule's own question)."""
    start = text.find("bool plain_eager(")
    return text if start < 0 else text[:start] + text[text.index("\n}\n", start) :]


def test_only_the_path_rule_reads_the_tracing_state():
    readers = []
    for path in sorted(SRC.rglob("*")):
        if path.suffix not in (".py", ".cpp", ".h") or path == SRC / "core" / "paths.py":
            continue
        text = _without_plain_eager(path.read_text()) if path.suffix == ".cpp" else path.read_text()
        for number, line in enumerate(text.splitlines(), 1):
            code = line.lstrip()
            if _TRACING_STATE.search(line) and not code.startswith(("#", "//")):
                readers.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
            # (the compiled module's Protocol declares it: a signature, not a read)
            if "plain_eager" in line and path.suffix == ".py" and not code.startswith("def plain_eager("):
                readers.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert not readers, "\n".join(readers)


@needs_kernels
def test_compiled_float32_cpu_rows_pointwise_decomposed_and_the_operator(monkeypatch):
    # what the rule answers while torch.compile traces (rows 15-17), asked without compiling
    monkeypatch.setattr(paths, "_is_dynamo_compiling", lambda: True)
    x = torch.randn(4, 3, 5)
    bn, gn = (None, None, None, -1, "identity", None), (None, None, None, 1, "relu", None)
    decomposed, operator = ("composed", "decomposed"), ("kernels", "traced")
    row = (5,), None, None
    with core.record_dispatch() as log:
        assert core.choose_path(x, call=bn)[:2] == decomposed  # training BatchNorm, with or without grad
        assert core.choose_path(x, call=bn[:4] + ("leaky_relu", None))[:2] == decomposed  # BatchNormAct
        assert core.choose_path(x, call=bn, given=True)[:2] == ("composed", "pointwise")  # eval BatchNorm
        # a compiled in-place call is asked out of place (the family entry reads computes_in_place),
        # and the rule answers it as one
        assert not paths.computes_in_place()
        assert core.choose_path(x, call=bn, inplace=True)[:2] == decomposed
        channels_last = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
        assert core.choose_path(channels_last, call=bn)[:2] == operator  # measured faster there
        assert core.choose_path(x, call=gn)[:2] == operator  # GroupNorm training: the operator is faster
        assert core.choose_path(x, paths.ROW, call=row)[:2] == operator
        with torch.no_grad():  # per-sample norms in eval
            assert core.choose_path(x, call=gn)[:2] == decomposed
            assert core.choose_path(x, paths.ROW, call=row)[:2] == decomposed
            assert core.choose_path(x, paths.ROW, centered=False, call=row)[:2] == decomposed
            assert core.choose_path(x, paths.CHANNELS_FIRST)[:2] == ("composed", "eager")
    # decisions taken while compiling are recorded (by the trace, which runs them from then on)
    assert len(log) == 11 and log[0] == ("norm", "composed", "compiling: shifted moments in ops the compiler fuses")
    with core.use_backend("native"):
        assert core.choose_path(x, call=bn)[:2] == ("native", "eager")
    with core.use_backend("composed"):
        assert core.choose_path(x, call=bn)[:2] == ("composed", "eager")
    assert core.choose_path(x.double(), call=bn)[:2] == ("native", "eager")  # float32 CPU only
