"""Which public names have no docstring, as the reference would render them (read by griffe)."""

from __future__ import annotations

import functools
from pathlib import Path

import griffe

from docsite.griffe_normlab import NormlabDocstrings
from docsite.public_api import all_public_names

ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def public_docstrings() -> dict[str, str]:
    """Public name's dotted path → its docstring as the reference renders it ("" where none)."""
    package = griffe.load(
        "normlab",
        search_paths=[str(ROOT / "src")],
        extensions=griffe.load_extensions(NormlabDocstrings),
        resolve_aliases=True,
    )
    docstrings = {}
    for entry in all_public_names():
        docstring = package[entry.path.removeprefix("normlab.")].docstring
        docstrings[entry.path] = docstring.value if docstring is not None else ""
    return docstrings


def undocumented_names() -> list[str]:
    """Dotted paths of the public names whose docstring is missing or blank."""
    return [path for path, text in public_docstrings().items() if not text.strip()]
