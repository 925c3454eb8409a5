"""PyTorch's ModuleInfo/OpInfo inputs for its norm layers: normlab must do what torch.nn does.

One test per case (see ``suite.py`` for what is compared and how, and
``known_failures.py`` for the table of known differences, each a strict xfail).
"""

from __future__ import annotations

import fnmatch

import known_failures
import pytest
import suite
import torch

# every test here runs once per backend (conftest.BACKENDS)
pytestmark = pytest.mark.usefixtures("backend")


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: an OpenMP team costs more than it saves, many times over on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _params(cases):
    return [pytest.param(case, id=case.id, marks=known_failures.marks(case.id)) for case in cases]


#: Cases the composed backend fails, found by running this suite on it and not fixed yet:
#: strict xfails, so a fix shows (backend, case-id glob) → reason.
OPEN_ON_BACKEND: dict[tuple[str, str], str] = {}


@pytest.fixture(autouse=True)
def _open_on_backend(request, backend):
    case = request.node.callspec.params.get("case") if hasattr(request.node, "callspec") else None
    for (name, pattern), reason in OPEN_ON_BACKEND.items():
        if case is not None and backend == name and fnmatch.fnmatchcase(case.id, pattern):
            request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


def _judge(case, run):
    problems, skip = run(case)
    if skip is not None:
        pytest.skip(skip)
    known_failures.check(case.id, problems)


@pytest.mark.parametrize("case", _params(suite.module_cases()))
def test_module_db(case):
    _judge(case, suite.run_module_case)


@pytest.mark.parametrize("case", _params(suite.functional_cases()))
def test_op_db(case):
    _judge(case, suite.run_functional_case)


@pytest.mark.parametrize("case", _params(suite.error_cases()))
def test_error_inputs(case):
    _judge(case, suite.run_error_case)


def test_every_table_entry_matches_a_case():
    ids = [c.id for c in suite.module_cases() + suite.functional_cases() + suite.error_cases()]
    unused = [
        p for p in known_failures.KNOWN if not p.startswith("port.") and not any(fnmatch.fnmatchcase(i, p) for i in ids)
    ]
    assert not unused, f"table entries that match no case (typo or renamed case): {unused}"
