"""The one table of known differences between normlab and torch.nn in the torch suite.

``KNOWN`` maps a glob over case ids (``fnmatch``, case-sensitive) to ``(category, reason)``.
A matching case is marked ``xfail(strict=True, raises=KnownDifference)``:

- it fails as expected only when *every* problem it shows belongs to the categories of
  the entries that match it (``CATEGORIES`` says what text each category explains); any
  other problem is an ordinary failure, so an entry never hides a new defect;
- when a fix makes it pass, the strict xfail turns into a failure: delete the entry.

``python tests/torch_suite/survey.py`` lists what fails now and where this table is wrong.
Case ids: ``nn.<Module>/<module_db desc>/<dtype>/<train|eval>/<layout>``,
``F.<functional>/<index in the OpInfo's reference inputs>-<input shape>/<dtype>/<layout>``
and ``nn.<Module>/error<i>``, ``F.<functional>/error<i>`` for PyTorch's error inputs;
``port.<test>`` and ``port.<test>/<Module>/<desc>/<mode>`` for the ported tests, whose
strict xfail names the exception they fail with (``PORT_RAISES``).
"""

from __future__ import annotations

import fnmatch
import re

import pytest

from normlab.core import InputError

#: category → the problem text (a regex, matched at the start) that category explains.
CATEGORIES: dict[str, str] = {
    "InstanceNorm counts batches (documented)": r"buffer num_batches_tracked: ",
    "empty batch not counted (documented)": r"buffer num_batches_tracked: ",
    "eps < 0 rejected (documented)": r"normlab raises InputError at call: eps must be a finite number >= 0 .*got -",
    "momentum outside [0, 1] rejected (documented)": r"normlab raises InputError at call: momentum must lie in \[0, 1\]",
    # Categories seen only in the ported tests (they fail with an exception, not a text):
    "empty normalized_shape refused at construction (documented)": r"$^",
}

#: The exception a ported test (id ``port.…``) of each category fails with.
PORT_RAISES: dict[str, type[BaseException]] = {
    "empty normalized_shape refused at construction (documented)": InputError,
}

KNOWN: dict[str, tuple[str, str]] = {
    # Deliberate, in docs/conventions.md: normlab's InstanceNorm counts the batches folded
    # into its running estimates (momentum=None needs the count); torch.nn leaves 0.
    "nn.InstanceNorm?d/tracking_stats/*/train/*": (
        "InstanceNorm counts batches (documented)",
        "num_batches_tracked 3 where torch.nn keeps 2",
    ),
    "nn.InstanceNorm?d/no_batch_dim/*/train/*": (
        "InstanceNorm counts batches (documented)",
        "num_batches_tracked 3 where torch.nn keeps 2",
    ),
    # Deliberate: an empty batch folds nothing into the running estimates, so it is not
    # counted either (torch.nn counts it, which shifts a momentum=None average).
    "nn.BatchNorm?d/zero_batch/*/train/*": (
        "empty batch not counted (documented)",
        "num_batches_tracked 2 where torch.nn counts 3",
    ),
    # OpInfo samples with eps=-0.5: torch computes (NaN where var < 0.5), normlab raises.
    "F.group_norm/0[4-7]-2x6x3/*": ("eps < 0 rejected (documented)", "sample eps=-0.5"),
    "F.layer_norm/01-2x2x3/*": ("eps < 0 rejected (documented)", "sample eps=-0.5"),
    "F.rms_norm/01-2x2x3/*": ("eps < 0 rejected (documented)", "sample eps=-0.5"),
    # OpInfo samples with momentum -1.2 / -1.0 in training: torch extrapolates, normlab raises.
    "F.batch_norm/05-3x2x3x4/*": ("momentum outside [0, 1] rejected (documented)", "sample momentum=-1.0"),
    "F.instance_norm/0[245]-*": ("momentum outside [0, 1] rejected (documented)", "samples momentum=-1.2 / -1.0"),
    # --- ports of test_nn.py / test_modules.py (test_torch_nn_ported.py)
    "port.LayerNorm_general": (
        "empty normalized_shape refused at construction (documented)",
        "LayerNorm(()) raises InputError at construction; torch.nn raises RuntimeError at the first call",
    ),
}


class KnownDifference(AssertionError):
    """Raised when every problem of a case is explained by its table entries."""


def known_entries(case_id: str) -> list[tuple[str, str]]:
    """The table's (category, reason) entries whose pattern matches ``case_id``."""
    return [entry for pattern, entry in KNOWN.items() if fnmatch.fnmatchcase(case_id, pattern)]


def known_failure(case_id: str) -> tuple[str, str] | None:
    entries = known_entries(case_id)
    return entries[0] if entries else None


#: Every id ``marks`` was asked about, so a test can find table entries that match nothing.
SEEN_IDS: set[str] = set()


def marks(case_id: str) -> list:
    SEEN_IDS.add(case_id)
    entries = known_entries(case_id)
    if not entries:
        return []
    reason = "; ".join(f"[{category}] {reason}" for category, reason in entries)
    if case_id.startswith("port."):
        raises = tuple({PORT_RAISES[category] for category, _ in entries})
    else:
        raises = KnownDifference
    return [pytest.mark.xfail(strict=True, raises=raises, reason=reason)]


def check(case_id: str, problems: list[str]) -> None:
    """Raise if ``problems`` is not empty: KnownDifference when the table explains them all."""
    if not problems:
        return
    entries = known_entries(case_id)
    unexplained = [p for p in problems if not any(re.match(CATEGORIES[category], p) for category, _ in entries)]
    text = "\n".join(f"  - {p}" for p in problems)
    if entries and not unexplained:
        raise KnownDifference(f"{case_id}: known ({', '.join(c for c, _ in entries)}):\n{text}")
    raise AssertionError(f"{case_id}: normlab differs from torch.nn:\n{text}")


def _check_table() -> None:
    for pattern, (category, _) in KNOWN.items():
        if category not in CATEGORIES:
            raise KeyError(f"KNOWN[{pattern!r}] names category {category!r}, not in CATEGORIES")
        if pattern.startswith("port.") and category not in PORT_RAISES:
            raise KeyError(f"KNOWN[{pattern!r}]: category {category!r} has no PORT_RAISES entry")


_check_table()
