import importlib.util
import os

import pytest
import torch

# Without a GPU the Triton kernels are tested under Triton's interpreter, on CPU tensors. Triton
# reads the switch when its language and a kernel are defined — and importing normlab imports
# torch._dynamo, which imports triton — so it is set before normlab is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

import normlab as nl  # noqa: E402

# Deterministic, database-free property tests: CI sees the same examples every run and
# nothing is written to .hypothesis/. NORMLAB_HYPOTHESIS=dev explores more, randomly.
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("NORMLAB_HYPOTHESIS", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


#: The backends the per-backend suites run on (``set_backend`` names): the C++ kernels (what a
#: float32 CPU call takes; other dtypes fall to native), torch's own ops (what every CUDA,
#: float64 and half-precision call takes) and normlab's composed ops. The first is the default
#: path; a backend that registers itself with the path rule adds its name here.
BACKENDS = ("kernels", "native", "composed")
#: Backends the suites run on only when asked by name in NORMLAB_TEST_BACKENDS, or for files
#: marked ``with_triton`` (the in-place mode, add + norm: cheap enough for CI): the Triton
#: kernels, on CPU tensors under Triton's interpreter (minutes for the other suites).
ON_REQUEST = ("triton",)
_TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
#: Examples per Hypothesis property on the backends after the first: the properties explore
#: inputs in full on the default path, and check the same kind of inputs on the others (CI's
#: time budget). NORMLAB_HYPOTHESIS=dev explores every backend in full.
EXAMPLES_ON_OTHER_BACKENDS = 8


def pytest_generate_tests(metafunc):
    """A test that uses the ``backend`` fixture runs once per backend in :data:`BACKENDS`, or
    on those its ``backends(...)`` mark names (a property of one path); NORMLAB_TEST_BACKENDS
    (a comma-separated list) narrows that down."""
    direct = any("backend" in _argnames(mark) for mark in metafunc.definition.iter_markers("parametrize"))
    if "backend" in metafunc.fixturenames and not direct:
        mark = metafunc.definition.get_closest_marker("backends")
        names = set(mark.args if mark is not None else BACKENDS + ON_REQUEST)
        chosen = os.environ.get("NORMLAB_TEST_BACKENDS")  # e.g. "kernels": the default path only
        if chosen:  # e.g. "triton": the suites on the Triton kernels under the interpreter
            names &= {name.strip() for name in chosen.split(",")}
        elif not (metafunc.definition.get_closest_marker("with_triton") and _TRITON_ON_CPU):
            names -= set(ON_REQUEST)
        metafunc.parametrize("backend", [name for name in BACKENDS + ON_REQUEST if name in names], indirect=True)


def _argnames(mark) -> list[str]:
    names = mark.args[0]
    return [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)


@pytest.fixture
def backend(request):
    """Runs the test with normlab's backend forced to each of :data:`BACKENDS` in turn; a test
    module opts in with ``pytestmark = pytest.mark.usefixtures("backend")``."""
    name = request.param
    test = request.function
    bound = getattr(test, "_hypothesis_internal_use_settings", None)
    fewer = name != BACKENDS[0] and bound is not None and os.environ.get("NORMLAB_HYPOTHESIS", "ci") == "ci"
    if fewer:  # Hypothesis reads the settings bound to the test each time it runs it
        test._hypothesis_internal_use_settings = settings(
            bound, max_examples=min(bound.max_examples, EXAMPLES_ON_OTHER_BACKENDS)
        )
    try:
        with nl.core.use_backend(name):
            yield name
    finally:
        if fewer:
            test._hypothesis_internal_use_settings = bound
