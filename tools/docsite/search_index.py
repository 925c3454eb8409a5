"""The search index of the API reference pages, made useful as a result list.

Each public name has a page whose whole content sits under one heading (the name's anchor), so
the search index holds an empty entry for the page and one for that section, which starts with
the signature. In the results a reader saw the name with no text under it, or a signature of
fifteen lines where the summary should be. After the build, each such page's entry gets the
name's first paragraph, and the section's signature is left out of its text (the arguments are
in its ``Args`` section, which stays searchable).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from docsite.public_api import all_public_names
from docsite.reference import name_page_path

_LEADING_SIGNATURE = re.compile(r"^\s*<pre><code>.*?</code></pre>\s*", re.S)
_FIRST_PARAGRAPH = re.compile(r"<p>.*?</p>", re.S)


def improve_reference_entries(docs: list[dict]) -> int:
    """Rewrite the index's ``docs`` in place, as said above; returns the pages changed."""
    pages = {name_page_path(e).removesuffix(".md") + ".html": e.path for e in all_public_names()}
    by_location = {doc["location"]: doc for doc in docs}
    changed = 0
    for page, path in pages.items():
        top, section = by_location.get(page), by_location.get(f"{page}#{path}")
        if top is None or section is None:
            continue
        section["text"] = _LEADING_SIGNATURE.sub("", section["text"])
        first = _FIRST_PARAGRAPH.search(section["text"])
        if not top["text"].strip() and first is not None:
            top["text"] = first.group(0)
            changed += 1
    return changed


def rewrite(site_dir: Path) -> int:
    """Apply :func:`improve_reference_entries` to the built site's ``search_index.json``."""
    index_path = site_dir / "search" / "search_index.json"
    if not index_path.is_file():
        return 0
    index = json.loads(index_path.read_text(encoding="utf-8"))
    changed = improve_reference_entries(index["docs"])
    index_path.write_text(json.dumps(index, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    return changed
