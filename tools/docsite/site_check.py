"""What a built site must hold: a page and an anchor for every public name, and each in the search."""

from __future__ import annotations

import json
from pathlib import Path

from docsite.public_api import PublicName, all_public_names
from docsite.reference import name_page_path


def missing_from_site(site_dir: Path, names: list[PublicName] | None = None) -> list[str]:
    """The public names (all of them unless given) that the built site at ``site_dir`` lacks:
    no page, no anchor with the name's dotted path, or no entry in the search index."""
    index = json.loads((site_dir / "search" / "search_index.json").read_text(encoding="utf-8"))
    searchable = {doc["location"] for doc in index["docs"]}
    missing = []
    for entry in all_public_names() if names is None else names:
        page = name_page_path(entry).removesuffix(".md") + ".html"
        html = site_dir / page
        if not html.is_file():
            missing.append(f"{entry.path}: no page {page}")
        elif f'id="{entry.path}"' not in html.read_text(encoding="utf-8"):
            missing.append(f"{entry.path}: {page} has no anchor {entry.path}")
        elif f"{page}#{entry.path}" not in searchable:
            missing.append(f"{entry.path}: not in the search index")
    return missing
