"""Builds normlab's documentation site (mkdocs-material + mkdocstrings); not part of the package.

``mkdocs.yml`` at the repository root names :mod:`docsite.hooks` (pages generated at build
time: the README's pages, the API reference from ``__all__``, the command-line reference)
and :mod:`docsite.griffe_normlab` (docstrings as ``help()`` shows them, written in Markdown).
"""
