"""MkDocs hook: the `<!-- cli-reference -->` marker in cli.md becomes the help of every `chip-ext`
subcommand, generated from the argparse parsers (`chip_ext.cli.build_parser`), so the page cannot drift
from the code."""
from __future__ import annotations

import argparse

MARKER = "<!-- cli-reference -->"


def reference() -> str:
    from chip_ext.cli import build_parser

    parser = build_parser()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = ["```text", parser.format_help().rstrip(), "```"]
    for name, p in sub.choices.items():
        p.prog = f"chip-ext {name}"
        parts += [f"\n### chip-ext {name}\n", "```text", p.format_help().rstrip(), "```"]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return markdown.replace(MARKER, reference()) if MARKER in markdown else markdown
