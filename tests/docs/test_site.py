"""The documentation site: its strict build, and every public name in its reference and search.

The build is run once per session (about 15 s of CPU; a minute of wall time on a loaded
2-core machine) into a temporary folder; the rest reads what it wrote.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

pytest.importorskip("mkdocs", reason="the docs extra is not installed")
pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra is not installed")

from docsite.docstring_check import argument_mismatch, argument_mismatches, undocumented_names  # noqa: E402
from docsite.public_api import PUBLIC_MODULES, PublicName, all_public_names  # noqa: E402
from docsite.site_check import missing_from_site  # noqa: E402


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    command = [mkdocs] if mkdocs else [sys.executable, "-m", "mkdocs"]
    out = tmp_path_factory.mktemp("site")
    # strict comes from mkdocs.yml; --strict again so that a change there cannot loosen the test
    result = subprocess.run(
        [*command, "build", "--strict", "--site-dir", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return out


def test_every_public_name_has_a_docstring():
    assert undocumented_names() == []


def test_every_argument_of_every_public_callable_is_documented():
    """Each public class's constructor and function: every parameter has an ``Args:`` entry (a
    dataclass's fields may be ``Attributes:``), and every entry is a parameter."""
    assert argument_mismatches() == []


def _example(a: int, b: float = 1.0, *rest: int, c: str = "", _private: int = 0, **options: int) -> None:
    pass


@pytest.mark.parametrize(
    ("docstring", "expected"),
    [
        (
            "Example.\n\nArgs:\n    a: one.\n    b: two.\n    *rest: more.\n    c: three.\n    **options: the rest.",
            None,
        ),
        # the shared form "a, b: ..." is what the source may write; the site splits it
        ("Example.\n\nArgs:\n    a, b: one and two.\n    rest, c, options: the others.", None),
        ("Example.\n\nArgs:\n    a: one.\n    c: three.", "not documented: b, rest, options"),
        ("Example without sections.", "not documented: a, b, rest, c, options"),
        (
            "Example.\n\nArgs:\n    a, b, rest, c, options: all.\n    d: gone.",
            "documented but not in the signature: d",
        ),
    ],
)
def test_argument_mismatch_reports_missing_and_unknown_entries(docstring, expected):
    from docsite.griffe_normlab import rst_to_markdown

    problem = argument_mismatch("example", _example, rst_to_markdown(docstring, {}))
    assert problem == (None if expected is None else f"example: {expected}")


def test_a_dataclass_may_document_its_fields_as_attributes():
    import dataclasses

    @dataclasses.dataclass
    class Record:
        name: str
        size: int = 0

    assert argument_mismatch("Record", Record, "A record.\n\nAttributes:\n    name: n.\n    size: s.") is None
    assert argument_mismatch("Record", Record, "A record.\n\nAttributes:\n    name: n.") == (
        "Record: not documented: size"
    )


def test_public_names_are_read_from_all():
    names = all_public_names()
    assert {e.module for e in names} == set(PUBLIC_MODULES)
    assert "normlab.nn.BatchNormAct2d" in {e.path for e in names}
    assert len({e.path for e in names}) == len(names)


@pytest.mark.slow
def test_strict_build_has_every_public_name_in_reference_and_search(site):
    assert missing_from_site(site) == []


@pytest.mark.slow
def test_a_name_missing_from_the_site_is_reported(site):
    import normlab

    ghost = PublicName("normlab.nn", "NotAPublicName", object())
    removed = PublicName("normlab.nn", "BatchNorm2d", normlab.nn.BatchNorm2d)
    page = site / "reference" / "nn" / "BatchNorm2d.html"
    text = page.read_text(encoding="utf-8")
    page.write_text(text.replace('id="normlab.nn.BatchNorm2d"', 'id="elsewhere"'), encoding="utf-8")
    try:
        missing = missing_from_site(site, [ghost, removed])
    finally:
        page.write_text(text, encoding="utf-8")
    assert [m.split(":")[0] for m in missing] == ["normlab.nn.NotAPublicName", "normlab.nn.BatchNorm2d"]


@pytest.mark.slow
def test_cli_reference_has_every_command(site):
    from normlab.cli import build_parser

    text = (site / "reference" / "cli.html").read_text(encoding="utf-8")
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in commands:
        assert f"usage: normlab {name}" in text, name
    assert "usage: normlab bench layers" in text  # sub-subcommands too


@pytest.mark.slow
def test_math_is_mathml_and_nothing_loads_from_the_network(site):
    page = (site / "reference" / "nn" / "BatchNorm2d.html").read_text(encoding="utf-8")
    assert "<math" in page and "arithmatex" not in page
    derivations = (site / "derivations.html").read_text(encoding="utf-8")
    assert derivations.count("<math") >= 10
    for html in site.rglob("*.html"):
        text = html.read_text(encoding="utf-8")
        for remote in ('src="http', 'href="https://fonts', "cdn.jsdelivr", "unpkg.com", "googleapis"):
            assert remote not in text, (html.relative_to(site), remote)


@pytest.mark.slow
def test_readme_pages_keep_links_and_figures_working(site):
    studies = (site / "studies.html").read_text(encoding="utf-8")
    assert 'src="figures/batch-size.png"' in studies
    assert (site / "figures" / "batch-size.png").is_file()
    start = (site / "getting-started.html").read_text(encoding="utf-8")
    assert 'href="sequences.html"' in start
