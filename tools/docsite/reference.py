"""The API reference pages, written from ``__all__`` at build time (nothing pasted, nothing to forget)."""

from __future__ import annotations

from docsite.public_api import PUBLIC_MODULES, PublicName, public_names


def page_path(module_name: str) -> str:
    return f"reference/{module_name.removeprefix('normlab.')}.md"


def name_page_path(entry: PublicName) -> str:
    """One page per public name: a class's methods, arguments and examples read without scrolling
    past fifty others, and each has its own address."""
    return f"reference/{entry.module.removeprefix('normlab.')}/{entry.name}.md"


def _summary(entry: PublicName, docstrings: dict[str, str]) -> str:
    """The first paragraph of a name's docstring (as the reference renders it), on one line."""
    first = docstrings.get(entry.path, "").strip().split("\n\n", 1)[0].replace("\n", " ")
    first = first.replace("|", "\\|")
    return first if len(first) <= 160 else first[:157].rsplit(" ", 1)[0] + " …"


def module_page(module_name: str, docstrings: dict[str, str]) -> str:
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
    for e in entries:
        target = name_page_path(e).removeprefix("reference/")
        lines.append(f"| [`{e.name}`]({target}) | {e.kind} | {_summary(e, docstrings)} |")
    return "\n".join(lines) + "\n"


def name_page(entry: PublicName) -> str:
    # the heading mkdocstrings writes is the page's title and the anchor other pages link to
    return "\n".join(
        [
            f"::: {entry.path}",
            "    options:",
            "      show_root_heading: true",
            "      show_root_full_path: false",
            "      heading_level: 1",
            "",
        ]
    )


def nav() -> list[object]:
    """The reference's navigation: each module's page, then its names."""
    items: list[object] = ["reference/index.md"]
    for module_name in PUBLIC_MODULES:
        children: list[object] = [page_path(module_name)]
        children += [{e.name: name_page_path(e)} for e in public_names(module_name)]
        items.append({module_name: children})
    items.append({"Command line": "reference/cli.md"})
    return items


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
