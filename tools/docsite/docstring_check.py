"""Which public names have no docstring, as the reference would render them (read by griffe)."""

from __future__ import annotations

from pathlib import Path

import griffe

from docsite.griffe_normlab import NormlabDocstrings
from docsite.public_api import all_public_names

ROOT = Path(__file__).resolve().parents[2]


def undocumented_names() -> list[str]:
    """Dotted paths of the public names whose docstring is missing or blank."""
    package = griffe.load(
        "normlab",
        search_paths=[str(ROOT / "src")],
        extensions=griffe.load_extensions(NormlabDocstrings),
        resolve_aliases=True,
    )
    missing = []
    for entry in all_public_names():
        obj = package[entry.path.removeprefix("normlab.")]
        docstring = obj.docstring
        if docstring is None or not docstring.value.strip():
            missing.append(entry.path)
    return missing
