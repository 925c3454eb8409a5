"""The command-line reference: the ``--help`` of every ``normlab`` command, taken from the parser."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:  # argparse keeps subparsers nowhere public
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # aliases map to the same parser
                    seen.add(id(sub))
                    yield name, sub


def _walk(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str]]:
    yield words, parser.format_help()
    for name, sub in _subcommands(parser):
        yield from _walk(sub, (*words, name))


def cli_page() -> str:
    from normlab.cli import build_parser

    # argparse wraps help at the terminal's width: fix it, so the page is the same on every machine
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parser = build_parser()
        helps = list(_walk(parser, ("normlab",)))
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    lines = [
        "# Command line",
        "",
        "`normlab COMMAND [options]`: the output of `--help` for every command, generated from "
        "the parser when the site is built. Guides: [Experiments](../experiments.md) "
        "(`run`, `study`, `list`), [Surgery](../surgery.md#command-line) (`surgery`), "
        "[Performance](../performance.md) (`bench`).",
        "",
    ]
    for words, text in helps:
        heading = "#" * min(len(words) + 1, 4)
        lines += [f"{heading} `{' '.join(words)}`", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(lines)
