"""A griffe extension: normlab's docstrings as ``help()`` shows them, rendered as Markdown.

Three things griffe's static reading would otherwise get wrong or leave out:

- docstrings built at import time (``BatchNorm1d/2d/3d`` format one template, so that the
  three cannot drift): the class's or function's runtime ``__doc__`` replaces what the
  source text shows;
- Sphinx-style ``#:`` comments above an assignment, which the source uses to document
  constants and dataclass fields: they become that attribute's docstring;
- reStructuredText in the docstrings (they follow torch.nn's, read by ``help()`` and IDEs):
  ``.. math::`` blocks and ``:math:`` roles become ``$$ … $$`` / ``$ … $`` (rendered to
  MathML by the site), ``:class:``/``:func:``/… roles become links where the target is a
  documented public name and code otherwise, and ``text::`` literal blocks become fenced code.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
import textwrap
from pathlib import Path
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|data|mod|obj|exc|const):`~?([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
# ``docs/conventions.md#momentum`` in a docstring: a link to that guide on the site, written
# from the docs root (mkdocs.yml resolves such links there), as reference pages sit at two depths
_GUIDE = re.compile(r"``docs/([a-z_-]+\.md)(#[a-z0-9_-]+)?``")
_DOCS = Path(__file__).resolve().parents[2] / "docs"


def _runtime_object(path: str) -> Any:
    """The object at a dotted path, imported; None where it cannot be reached."""
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return None
        return obj
    return None


def _public_paths() -> dict[str, str]:
    """Short and full names of every documented public name → its anchor in the reference."""
    from docsite.public_api import all_public_names

    paths: dict[str, str] = {}
    for entry in all_public_names():
        paths[entry.path] = entry.path
        paths.setdefault(entry.name, entry.path)  # first module wins: nn before core
    return paths


def _role_to_markdown(match: re.Match[str], public: dict[str, str]) -> str:
    target = match.group(2).strip()
    shown = target.rsplit(".", 1)[-1] if match.group(0).split("`", 1)[1].startswith("~") else target
    anchor = public.get(target)
    if anchor is not None:
        return f"[`{shown}`][{anchor}]"
    return f"`{shown}`"


def _math_blocks(text: str) -> str:
    """``.. math::`` directives → ``$$`` blocks at the directive's indentation."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if stripped.startswith(".. math::"):
            indent = line[: len(line) - len(stripped)]
            body: list[str] = []
            inline = stripped[len(".. math::") :].strip()
            if inline:
                body.append(inline)
            i += 1
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(indent)):
                body.append(lines[i])
                i += 1
            formula = textwrap.dedent("\n".join(body)).strip()
            out += [f"{indent}$$", *(indent + f for f in formula.split("\n")), f"{indent}$$", ""]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _literal_blocks(text: str) -> str:
    """reST literal blocks (a paragraph ending in ``::``, then an indented block) → fenced code.

    ``Example::`` followed by ``>>>`` lines becomes a Google-style ``Examples:`` section, which
    mkdocstrings renders as a highlighted console session."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::") and not line.lstrip().startswith(".."):
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and _indent(lines[j]) > _indent(line):
                k = j
                while k < len(lines) and (not lines[k].strip() or _indent(lines[k]) > _indent(line)):
                    k += 1
                block = textwrap.dedent("\n".join(lines[j:k])).rstrip()
                indent = " " * _indent(line)
                head = line.rstrip()[:-1]  # "text::" → "text:"
                if head.strip() == ":":  # a bare "::" paragraph
                    head = ""
                if line.strip() in ("Example::", "Examples::") and block.startswith(">>>"):
                    out.append(indent + "Examples:")  # the Google section name griffe knows
                    out += [indent + "    " + b if b else "" for b in block.split("\n")]
                else:
                    lexer = "pycon" if block.startswith(">>>") else "python"
                    if head.strip():
                        out += [head, ""]
                    out += [
                        f"{indent}```{lexer}",
                        *(indent + b if b else "" for b in block.split("\n")),
                        f"{indent}```",
                    ]
                out.append("")
                i = k
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


_SHARED_ARGUMENT = re.compile(r"^(\s+)([A-Za-z_]\w*(?:, [A-Za-z_]\w*)+):(?: (.*))?$")


def _shared_arguments(text: str) -> str:
    """``a, b: what both are`` in an ``Args:`` section → one entry per argument, so that each
    is matched with the signature (the source keeps the shorter form ``help()`` reads well in)."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _SHARED_ARGUMENT.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent, names, first = match.groups()
        first = first or ""
        j = i + 1
        while j < len(lines) and lines[j].strip() and _indent(lines[j]) > len(indent):
            j += 1
        for name in names.split(", "):
            out += [f"{indent}{name}: {first}", *lines[i + 1 : j]]
        i = j
    return "\n".join(out)


_TABLE_BORDER = re.compile(r"^\s*=+(?:\s+=+)+\s*$")


def _cells(row: str, starts: list[int]) -> list[str]:
    """A simple table's row cut at its columns' starts (a cell runs to the next column)."""
    bounds: list[int | None] = [*starts[1:], None]
    return [row[a:b].strip().replace("|", "\\|") for a, b in zip(starts, bounds)]


def _simple_tables(text: str) -> str:
    """reST simple tables (``===  ===`` borders around a header and rows) → Markdown tables."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not _TABLE_BORDER.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        border = lines[i]
        starts = [m.start() for m in re.finditer(r"=+", border)]
        ends = [m.end() for m in re.finditer(r"=+", border)]
        borders = [j for j in range(i, len(lines)) if lines[j] == border][:3]
        if len(borders) < 3:
            out.append(lines[i])
            i += 1
            continue

        indent = " " * starts[0]
        header = _cells(lines[borders[0] + 1], starts)
        rows = [_cells(row, starts) for row in lines[borders[1] + 1 : borders[2]] if row.strip()]
        out += [indent + "| " + " | ".join(header) + " |", indent + "|" + "---|" * len(ends)]
        out += [indent + "| " + " | ".join(row) + " |" for row in rows]
        i = borders[2] + 1
    return "\n".join(out)


@functools.cache
def _guide_headings(page: str) -> dict[str, str]:
    """A guide's headings by anchor (as the site's table of contents makes them), and its
    title under ""; empty where docs/ has no such page."""
    from markdown.extensions.toc import slugify

    path = _DOCS / page
    if not path.is_file():
        return {}
    headings: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
            headings.setdefault("" if line.startswith("# ") else "#" + slugify(heading.replace("`", ""), "-"), heading)
    return headings


def _guide_link(page: str, anchor: str) -> str:
    """``docs/conventions.md#running-statistics`` as a link whose text is the section's heading
    ("Running statistics"), the page's title without an anchor; the path itself where the page
    or the section does not exist (so that the strict build's link check still sees it)."""
    text = _guide_headings(page).get(anchor, f"docs/{page}{anchor}")
    return f"[{text}](/{page}{anchor})"


def rst_to_markdown(text: str, public: dict[str, str]) -> str:
    """The reST constructs normlab's docstrings use, written as the site's Markdown."""
    text = _simple_tables(text)
    text = _shared_arguments(text)
    text = _math_blocks(text)
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1).strip()}$", text)
    text = _ROLE.sub(lambda m: _role_to_markdown(m, public), text)
    text = _GUIDE.sub(lambda m: _guide_link(m.group(1), m.group(2) or ""), text)
    return _literal_blocks(text)


def _comment_docstring(attr: griffe.Attribute) -> str | None:
    """The ``#:`` comment lines right above (or at the end of) an attribute's assignment."""
    lines = attr.module.lines  # the whole file: lineno counts from its top
    if not lines or attr.lineno is None:
        return None
    first = attr.lineno - 1
    comment: list[str] = []
    k = first - 1
    while k >= 0 and lines[k].lstrip().startswith("#:"):
        comment.insert(0, lines[k].lstrip()[2:].strip())
        k -= 1
    return " ".join(comment) or None


class NormlabDocstrings(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """A public function named like the submodule that defines it (``normlab.functional.scale_norm``,
        ``norm_act``, ``weight_standardization``) is what ``normlab.functional.scale_norm`` means at
        run time, but griffe reads that path as the submodule: its reference page showed the
        module's docstring above the function. The path is made to name the function."""
        if pkg.name != "normlab":
            return
        from docsite.public_api import all_public_names

        for entry in all_public_names():
            if inspect.ismodule(entry.obj):
                continue
            shadowed = pkg.get_member(entry.path.removeprefix("normlab."))
            if shadowed.is_module and entry.name in shadowed.members:
                parent = shadowed.parent
                assert parent is not None  # a submodule has its package as parent
                function = shadowed.members[entry.name]
                parent.set_member(entry.name, griffe.Alias(entry.name, function, parent=parent))
                # griffe's later pass over the members no longer reaches it through the module
                self.on_object(obj=function)

    def __init__(self) -> None:
        super().__init__()
        self._public: dict[str, str] | None = None

    @property
    def public(self) -> dict[str, str]:
        if self._public is None:
            self._public = _public_paths()
        return self._public

    def on_attribute_instance(
        self, *, node: ast.AST | griffe.ObjectNode, attr: griffe.Attribute, **kwargs: Any
    ) -> None:
        if attr.docstring is None:
            text = _comment_docstring(attr)
            if text:
                attr.docstring = griffe.Docstring(text, parent=attr)

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.is_class or obj.is_function:
            runtime = _runtime_object(obj.path)
            doc = runtime.__doc__ if runtime is not None else None
            if obj.is_class and runtime is not None and not inspect.isclass(runtime):
                doc = None
            if isinstance(doc, str) and doc.strip():
                cleaned = inspect.cleandoc(doc)
                if obj.docstring is None or obj.docstring.value != cleaned:
                    obj.docstring = griffe.Docstring(cleaned, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value, self.public)
