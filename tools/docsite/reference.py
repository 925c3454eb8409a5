"""The API reference pages, written from ``__all__`` at build time (nothing pasted, nothing to forget)."""

from __future__ import annotations

import inspect

from docsite.public_api import PUBLIC_MODULES, PublicName, public_names

#: mkdocstrings options for one public name: its own docstring and its documented public members,
#: not torch.nn.Module's.
_OBJECT_OPTIONS = """\
    options:
      show_root_heading: true
      show_root_full_path: false
      heading_level: 2
"""


def page_path(module_name: str) -> str:
    return f"reference/{module_name.removeprefix('normlab.')}.md"


def _summary(entry: PublicName) -> str:
    """The first sentence-line of a name's docstring, for the page's table of contents."""
    doc = inspect.getdoc(entry.obj) if entry.kind in ("class", "function", "module") else None
    first = (doc or "").strip().split("\n\n", 1)[0].replace("\n", " ")
    first = first.replace("|", "\\|")
    return first if len(first) <= 140 else first[:137].rsplit(" ", 1)[0] + " …"


def module_page(module_name: str) -> str:
    title, _ = PUBLIC_MODULES[module_name]
    entries = public_names(module_name)
    lines = [
        f"# {title}",
        "",
        f"::: {module_name}",
        "    options:",
        "      members: false",
        "      show_root_heading: false",
        "      show_root_toc_entry: false",
        "",
        "| name | kind | summary |",
        "|---|---|---|",
    ]
    lines += [f"| [`{e.name}`](#{e.path}) | {e.kind} | {_summary(e)} |" for e in entries]
    lines.append("")
    for entry in entries:
        lines += [f"::: {entry.path}", _OBJECT_OPTIONS]
    return "\n".join(lines)


def index_page() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings of every name in each module's `__all__`; the "
        "conventions the layers share (momentum, unbiased running variance, masks, in-place "
        "rules, non-finite batches) are stated once, in [Conventions](../conventions.md).",
        "",
        "| module | what it holds | names |",
        "|---|---|---|",
    ]
    for module_name, (_, blurb) in PUBLIC_MODULES.items():
        target = page_path(module_name).removeprefix("reference/")
        lines.append(f"| [`{module_name}`]({target}) | {blurb} | {len(public_names(module_name))} |")
    lines += ["", "The command line: [`normlab`](cli.md), every command's `--help`.", ""]
    return "\n".join(lines)
