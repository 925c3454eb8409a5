import os

import pytest
import torch
from hypothesis import HealthCheck, settings

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

# Without a GPU the Triton kernels are tested under Triton's interpreter, on CPU tensors. Triton
# reads the switch when a kernel is defined, so it is set before any test module imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
