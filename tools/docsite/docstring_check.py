"""Which public names have no docstring, or an ``Args:`` section that differs from their
signature, as the reference would render them (read by griffe)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from pathlib import Path
from typing import Any

import griffe

from docsite.griffe_normlab import NormlabDocstrings
from docsite.public_api import PublicName, all_public_names

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


def _signature_parameters(obj: Any) -> list[str] | None:
    """The names a caller passes, as ``help()`` shows them (a class: its constructor's);
    ``*args``/``**kwargs`` without their stars; names starting with ``_`` are private catch-alls
    (``**_`` swallows timm's extra keywords) and need no entry. None where there is no signature."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [name for name in signature.parameters if not name.startswith("_") and name != "self"]


def documented_parameters(docstring: str) -> tuple[list[str], list[str]]:
    """The names in the Google-style ``Args:`` sections, and those in ``Attributes:`` sections."""
    sections = griffe.Docstring(docstring).parse("google", warnings=False)
    args: list[str] = []
    attributes: list[str] = []
    for section in sections:
        if section.kind is griffe.DocstringSectionKind.parameters:
            args += [p.name.lstrip("*") for p in section.value]
        elif section.kind is griffe.DocstringSectionKind.attributes:
            attributes += [a.name for a in section.value]
    return args, attributes


def argument_mismatch(path: str, obj: Any, docstring: str) -> str | None:
    """What the docstring of ``obj`` gets wrong about its signature, in one line; None when every
    parameter has an entry and every entry is a parameter.

    A dataclass's or named tuple's fields may be documented as ``Attributes:`` instead (they are
    both its constructor's arguments and what it holds)."""
    parameters = _signature_parameters(obj)
    if parameters is None:
        return None
    args, attributes = documented_parameters(docstring)
    fields_as_attributes = inspect.isclass(obj) and (dataclasses.is_dataclass(obj) or hasattr(obj, "_fields"))
    covered = set(args) | (set(attributes) if fields_as_attributes else set())
    missing = [name for name in parameters if name not in covered]
    unknown = [name for name in args if name not in parameters]
    if not missing and not unknown:
        return None
    problems = []
    if missing:
        problems.append("not documented: " + ", ".join(missing))
    if unknown:
        problems.append("documented but not in the signature: " + ", ".join(unknown))
    return f"{path}: " + "; ".join(problems)


def _short_name_of_another(entry: PublicName, names: list[PublicName]) -> bool:
    defined_as = getattr(entry.obj, "__name__", entry.name)
    return defined_as != entry.name and any(
        other.obj is entry.obj and other.name == defined_as and other.module == entry.module for other in names
    )


def argument_mismatches() -> list[str]:
    """One line for each public class or function whose ``Args:`` section and signature differ."""
    docstrings = public_docstrings()
    names = all_public_names()
    found = []
    for entry in names:
        if entry.kind not in ("class", "function"):
            continue
        if _short_name_of_another(entry, names):
            continue  # ``xavier_ = xavier_uniform_``: its page links the full name, checked there
        problem = argument_mismatch(entry.path, entry.obj, docstrings[entry.path])
        if problem is not None:
            found.append(problem)
    return found
