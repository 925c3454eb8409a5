"""The site's landing page, "Getting started" and "Studies", cut from the README at build time.

The README stays the one source (GitHub shows it, CI runs its set-up commands); this table
says which of its ``## `` sections go on which page. A section the table does not name, or
a name the README no longer has, fails the build, so the two cannot drift apart silently.
"""

from __future__ import annotations

import re
from pathlib import Path

#: page → (its title, the README's ``## `` sections on it, in the README's order). The intro
#: (before the first ``## ``) opens the landing page; None drops a section the site's navigation replaces.
PAGES: dict[str | None, tuple[str, tuple[str, ...]]] = {
    "index.md": (
        "normlab",
        ("What is checked, and how", "Performance, honestly", "Layout"),
    ),
    "getting-started.md": (
        "Getting started",
        (
            "Set-up",
            "Using it",
            "With torch.compile, export, ONNX, fx, torch.func and timm",
            "Model surgery",
            "SyncBatchNorm, on any backend",
            "Initialization and diagnostics",
        ),
    ),
    "studies.md": ("Studies", ("The studies",)),
    None: ("", ("Documentation",)),  # the list of guides: the site's navigation
}

_PAGE_INTRO = {
    "studies.md": (
        "Each study's method, settings, run times and every number beside the published one: "
        "[Experiments](experiments.md). Run them with `normlab study --quick` "
        "([Getting started](getting-started.md))."
    ),
}


def _sections(readme: str) -> tuple[str, dict[str, str]]:
    """The intro and the ``## `` sections of the README (title → body, fenced code kept whole)."""
    parts = re.split(r"^## (.+)$", readme, flags=re.MULTILINE)
    intro, rest = parts[0], parts[1:]
    return intro, {rest[i].strip(): rest[i + 1] for i in range(0, len(rest), 2)}


def _site_links(text: str) -> str:
    """The README's repository-relative links and images, as links between the site's pages."""
    text = re.sub(r"\[`docs/([^`]+)`\]\(docs/", r"[`\1`](", text)  # the link text names the page, too
    text = re.sub(r"\]\(docs/", "](", text)
    return text.replace('src="docs/', 'src="')


def readme_pages(readme_path: Path) -> dict[str, str]:
    """page path → Markdown; raises ValueError where the README and :data:`PAGES` disagree."""
    intro, sections = _sections(readme_path.read_text(encoding="utf-8"))
    named = [title for _, titles in PAGES.values() for title in titles]
    unplaced = [title for title in sections if title not in named]
    missing = [title for title in named if title not in sections]
    if unplaced or missing:
        raise ValueError(
            f"README.md and tools/docsite/readme_pages.py's PAGES disagree: sections on no page {unplaced}, "
            f"sections PAGES names that README.md lacks {missing}"
        )
    pages: dict[str, str] = {}
    for page, (title, titles) in PAGES.items():
        if page is None:
            continue
        body = [intro.strip()] if page == "index.md" else [f"# {title}"]
        if page in _PAGE_INTRO:
            body.append(_PAGE_INTRO[page])
        body += [f"## {t}\n{sections[t].rstrip()}" for t in titles]
        pages[page] = _site_links("\n\n".join(body) + "\n")
    return pages
