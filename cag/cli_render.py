"""How `cag ask` and `cag chat` show an answer's sources and its support.

Kept apart from cag.cli so the command module stays about flags, and so the text can be tested without a
model. Everything here goes to the console it is given: the CLI passes stderr, where its status and timing
lines already go, so stdout carries the answer alone (`cag ask kb "…" > answer.txt` writes just the answer;
--json carries sources and support for scripts).
"""

from __future__ import annotations

import textwrap
from typing import Sequence

from rich.console import Console

INDENT = "    "  # before each line of a snippet, under its source's line
MAX_WIDTH = 100  # snippets wrap at the console's width, but no wider: long lines are hard to read
WARNING = "⚠ not supported by the knowledge base"


def source_lines(sources: Sequence, width: int = 80) -> list[tuple[str, bool]]:
    """Each source as a numbered line (where to look it up, and its score), then its snippet wrapped and
    indented; each line with whether it is a snippet's (shown dim, as detail)."""
    width = max(min(width, MAX_WIDTH), 40)
    lines: list[tuple[str, bool]] = []
    for no, s in enumerate(sources, 1):
        where = f"{s.document} › {s.locator}" if s.locator else s.document
        lines.append((f"[{no}] {where}  ({s.score:.2f})", False))
        snippet = " ".join(s.snippet.split())  # a passage's own line breaks mean nothing once it is wrapped
        wrapped = textwrap.wrap(snippet, width, initial_indent=INDENT, subsequent_indent=INDENT,
                                break_long_words=True, break_on_hyphens=False)
        lines.extend((line, True) for line in wrapped)
    return lines


def warning(answer, shown: int) -> str | None:
    """One line for an answer its sources do not hold (None for a supported one). A refused answer says
    where the model's own text went; with no sources shown there are none to point at."""
    if answer.supported:
        return None
    line = f"{WARNING} (support {answer.support:.2f})"
    if answer.generated is not None:
        return line + ": the model's answer was replaced (--json shows it as `generated`)"
    return line + (": check the sources" if shown else "")


def show_grounding(console: Console, answer, shown: int) -> None:
    """Print an answer's sources (the first `shown`) and, when they do not support it, the warning."""
    for text, detail in source_lines(answer.sources[:shown], console.width):
        console.print(text, style="dim" if detail else None, markup=False, highlight=False)
    line = warning(answer, shown)
    if line:
        console.print(line, style="bold yellow", markup=False, highlight=False)


def answer_row(answer) -> dict:
    """An answer as `cag ask --json` writes it: every field but the token ids, sources as plain dicts
    (their tuples as lists), so a line is the same JSON whatever produced the answer."""
    row = answer.to_dict()
    row.pop("token_ids", None)
    row["sources"] = [s.to_dict() for s in answer.sources]
    return row
