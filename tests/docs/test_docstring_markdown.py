"""The site's reading of normlab's docstrings (reST as help() shows it) and of the README."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

pytest.importorskip("griffe", reason="the docs extra is not installed")

from docsite.griffe_normlab import rst_to_markdown  # noqa: E402
from docsite.readme_pages import PAGES, readme_pages  # noqa: E402

PUBLIC = {"BatchNorm2d": "normlab.nn.BatchNorm2d", "normlab.nn.BatchNorm2d": "normlab.nn.BatchNorm2d"}


def test_math_directive_and_role():
    text = "Intro.\n\n.. math::\n\n    y = \\frac{x}{2}\n\nwith :math:`x > 0`."
    assert rst_to_markdown(text, PUBLIC) == "Intro.\n\n$$\ny = \\frac{x}{2}\n$$\n\nwith $x > 0$."


def test_roles_link_public_names_and_quote_the_rest():
    text = "See :class:`BatchNorm2d`, :class:`~normlab.nn.BatchNorm2d` and :func:`torch.nn.functional.relu`."
    assert rst_to_markdown(text, PUBLIC) == (
        "See [`BatchNorm2d`][normlab.nn.BatchNorm2d], [`BatchNorm2d`][normlab.nn.BatchNorm2d] "
        "and `torch.nn.functional.relu`."
    )


def test_guide_paths_become_links_from_the_docs_root_named_by_their_heading():
    assert rst_to_markdown("(``docs/conventions.md#running-statistics``)", PUBLIC) == (
        "([Running statistics](/conventions.md#running-statistics))"
    )
    assert rst_to_markdown("``docs/surgery.md``", PUBLIC) == "[Model surgery](/surgery.md)"
    # a heading with code: the anchor is made without the backticks, the text keeps them
    assert rst_to_markdown("``docs/conventions.md#in-place-mode-inplacetrue-on-batchnormactgroupnormact``", PUBLIC) == (
        "[In-place mode (`inplace=True` on BatchNormAct/GroupNormAct)]"
        "(/conventions.md#in-place-mode-inplacetrue-on-batchnormactgroupnormact)"
    )
    # an anchor no heading has keeps its path as text (and the strict build reports the link)
    assert rst_to_markdown("``docs/sequences.md#masks``", PUBLIC) == "[docs/sequences.md#masks](/sequences.md#masks)"


def test_literal_blocks_become_fences_and_examples_stay_a_section():
    text = "Use it so::\n\n    f(x)\n    g(x)\n\nEnd."
    assert rst_to_markdown(text, PUBLIC) == "Use it so:\n\n```python\nf(x)\ng(x)\n```\n\nEnd."
    example = "Example::\n\n    >>> f(1)\n    2\n"
    assert rst_to_markdown(example, PUBLIC) == "Examples:\n    >>> f(1)\n    2\n"


def test_shared_argument_entries_are_split():
    text = "Args:\n    a, b: the two ends,\n        inclusive.\n    c: alone."
    assert rst_to_markdown(text, PUBLIC) == (
        "Args:\n    a: the two ends,\n        inclusive.\n    b: the two ends,\n        inclusive.\n    c: alone."
    )


def test_every_readme_section_is_placed(tmp_path):
    pages = readme_pages(ROOT / "README.md")
    assert set(pages) == {page for page in PAGES if page is not None}
    assert "](docs/" not in "".join(pages.values())


def test_a_readme_section_on_no_page_fails(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text(encoding="utf-8") + "\n## A new section\n\ntext\n")
    with pytest.raises(ValueError, match="A new section"):
        readme_pages(readme)


def test_simple_tables_become_markdown_tables():
    text = "Gains:\n\n====  =====\nname  value\n====  =====\ntanh  1\nrelu  √2\n====  =====\n\nEnd."
    assert rst_to_markdown(text, PUBLIC) == (
        "Gains:\n\n| name | value |\n|---|---|\n| tanh | 1 |\n| relu | √2 |\n\nEnd."
    )


def test_reference_search_entries_get_the_summary_and_lose_the_signature():
    from docsite.search_index import improve_reference_entries

    page = "reference/functional/batch_norm.html"
    section = (
        "<pre><code>batch_norm(\n    input: Tensor,\n) -&gt; torch.Tensor\n</code></pre> "
        "<p>Batch normalization of an input.</p> <p>More.</p>"
    )
    guide = {"location": "conventions.html", "title": "Conventions", "text": "<pre><code>x</code></pre>"}
    docs = [
        {"location": page, "title": "batch_norm", "text": ""},
        {"location": f"{page}#normlab.functional.batch_norm", "title": "batch_norm", "text": section},
        guide,
    ]
    assert improve_reference_entries(docs) == 1
    assert docs[0]["text"] == "<p>Batch normalization of an input.</p>"
    assert docs[1]["text"] == "<p>Batch normalization of an input.</p> <p>More.</p>"
    assert docs[2] == {"location": "conventions.html", "title": "Conventions", "text": "<pre><code>x</code></pre>"}
