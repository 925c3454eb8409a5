"""mkdocs hooks: the pages generated at build time, the docstring check and the math.

Generated, never committed: the landing page, "Getting started" and "Studies" (from the
README), the API reference (from ``__all__``) and the command-line reference (from the parser).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT / "tools", ROOT / "src"):  # this tree's normlab, not an installed one
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from mkdocs.plugins import event_priority  # noqa: E402
from mkdocs.structure.files import File  # noqa: E402

from docsite.cli_reference import cli_page  # noqa: E402
from docsite.docstring_check import argument_mismatches, public_docstrings, undocumented_names  # noqa: E402
from docsite.mathml import render_math  # noqa: E402
from docsite.public_api import PUBLIC_MODULES, all_public_names  # noqa: E402
from docsite.readme_pages import readme_pages  # noqa: E402
from docsite.reference import index_page, module_page, name_page, name_page_path, nav, page_path  # noqa: E402
from docsite.search_index import rewrite as rewrite_search_index  # noqa: E402

log = logging.getLogger("mkdocs.plugins.normlab")


def generated_pages() -> dict[str, str]:
    pages = readme_pages(ROOT / "README.md")
    pages["reference/index.md"] = index_page()
    pages |= {page_path(name): module_page(name, public_docstrings()) for name in PUBLIC_MODULES}
    pages |= {name_page_path(entry): name_page(entry) for entry in all_public_names()}
    pages["reference/cli.md"] = cli_page()
    return pages


def on_config(config):
    """The reference's navigation comes from ``__all__``: mkdocs.yml names its place, ``API reference``."""
    for index, item in enumerate(config["nav"]):
        if isinstance(item, dict) and "API reference" in item:
            config["nav"][index] = {"API reference": nav()}
            return config
    raise ValueError("mkdocs.yml's nav has no 'API reference' entry for the generated reference")


def on_files(files, config):
    for src_uri, content in generated_pages().items():
        if files.get_file_from_path(src_uri) is not None:
            log.warning("docs/%s exists and is also generated; the generated page wins", src_uri)
            files.remove(files.get_file_from_path(src_uri))
        files.append(File.generated(config, src_uri, content=content))
    for path in undocumented_names():
        log.warning("public name without a docstring: %s", path)  # --strict turns this into a failure
    for problem in argument_mismatches():
        log.warning("Args section and signature differ: %s", problem)
    return files


#: Guides ranked above the API pages that merely mention a word: a search for "momentum" or
#: "eps" should open with the convention, not with a converter that has the word in its name.
SEARCH_BOOST = {"conventions.md": 4}


def on_page_markdown(markdown, page, config, files):
    boost = SEARCH_BOOST.get(page.file.src_uri)
    if boost is not None:
        page.meta.setdefault("search", {}).setdefault("boost", boost)
    return markdown


def on_page_content(html, page, config, files):
    return render_math(html)


@event_priority(-50)  # after the search plugin writes the index, before the offline plugin inlines it
def on_post_build(config):
    rewrite_search_index(Path(config["site_dir"]))
