"""The passage index: every document cut into short passages a person can follow back to the file.

An answer's sources are passages of this index (cag.kb.grounding). A passage is a span of its document's
text (character offsets) with a locator: the heading path for Markdown and the Markdown that HTML, .docx
and .epub files are read as, the page for PDFs (the reader starts each page after the first with form
feeds), the line range for everything else. Passages end at blank lines and are cut at line, then sentence,
then word boundaries to at most MAX_CHARS, so a source's snippet is the passage itself and its first source
is the few sentences that hold a fact, not a whole section.

The index is made at build time (the same documents always give the same passages), kept in the cache's
manifest, which the cache file's checksum and signature cover, and travels with it through every tier.
Loading checks it against the documents it is used with (`from_json`): an index of other knowledge, of
another version of this splitter, or whose passages do not fit their documents is refused like a cache
made for something else.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Sequence

from ..errors import CacheFileError
from .knowledge import Document

VERSION = 1  # of the splitter: an index made by another one is refused (and the knowledge base rebuilt)
MAX_CHARS = 300  # a passage's length at most (a snippet is the passage)
HEADED = {".md", ".markdown", ".html", ".htm", ".docx", ".epub"}  # documents read as Markdown
PAGED = {".pdf"}
PAGE_BREAK = "\f"  # what the PDF reader puts before each page after the first

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# where a block may be cut: after a sentence's end, or at a line break that does not run on (the line before
# ends without a letter or comma, or the next one starts a list item or a table row)
_BOUNDARY = re.compile(r"(?<=[.!?])\s+|(?<![\w,;])[ \t]*\n\s*|\n\s*(?=[-*+•|>]|\d+[.):]\s)")
MERGED_CHARS = 330  # a passage with its short last piece joined on


@dataclass(frozen=True)
class Passage:
    document: str  # the document's name (as the knowledge base shows it)
    start: int  # character offsets of the passage in its document's text
    end: int
    heading: tuple[str, ...] = ()  # the headings it sits under, outermost first (Markdown-like documents)
    page: int | None = None  # PDFs: the page it starts on (1-based)
    lines: tuple[int, int] = (1, 1)  # the lines it spans in the document's text (1-based, inclusive)

    @property
    def locator(self) -> str:
        """Where a person finds it: "Policies › Leave", "page 3", or "lines 4-9"."""
        if self.page is not None:
            return f"page {self.page}"
        if self.heading:
            return " › ".join(self.heading)
        first, last = self.lines
        return f"line {first}" if first == last else f"lines {first}-{last}"


@dataclass
class PassageIndex:
    """The passages of a knowledge base's documents, in document order."""

    passages: list[Passage]
    texts: list[str] = field(repr=False)  # each passage's text as shown (page breaks and runs of blanks folded)
    knowledge: str = ""  # the content hash of the documents it was made from (knowledge.content_hash)

    @classmethod
    def build(cls, docs: Sequence[Document], knowledge_sha: str = "") -> "PassageIndex":
        return cls._of([p for doc in docs for p in split(doc)], {d.name: d.text for d in docs}, knowledge_sha)

    @classmethod
    def _of(cls, passages: list[Passage], text: dict[str, str], knowledge_sha: str) -> "PassageIndex":
        """The index of these passages of documents whose text is given by name (their snippets cut from it)."""
        return cls(passages, [shown(text[p.document][p.start:p.end]) for p in passages], knowledge_sha)

    @classmethod
    def merge(cls, indexes: Sequence["PassageIndex"]) -> "PassageIndex":
        """One index over several (the shards of one knowledge base): sources are cited across all of them."""
        return cls([p for i in indexes for p in i.passages], [t for i in indexes for t in i.texts],
                   hashlib.sha256("".join(i.knowledge for i in indexes).encode()).hexdigest())

    def __len__(self) -> int:
        return len(self.passages)

    def to_json(self) -> dict:
        names = list(dict.fromkeys(p.document for p in self.passages))
        at = {n: i for i, n in enumerate(names)}
        rows = [[at[p.document], p.start, p.end, p.page, p.lines[0], p.lines[1], list(p.heading)]
                for p in self.passages]
        return {"version": VERSION, "knowledge": self.knowledge, "documents": names, "passages": rows,
                "sha256": _digest(self.passages, self.texts)}

    @classmethod
    def from_json(cls, data: object, docs: Sequence[Document], knowledge_sha: str) -> "PassageIndex":
        """The stored index, checked against the documents it will cite; CacheFileError naming what is wrong."""
        if not isinstance(data, dict):
            raise _refused(f"it is {type(data).__name__}, not an object")
        if data.get("version") != VERSION:
            raise _refused(f"it was made by passage splitter version {data.get('version')!r}; this cag makes "
                           f"version {VERSION}: rebuild the knowledge base (`cag build`)")
        if data.get("knowledge") != knowledge_sha:
            raise _refused(f"it was made for knowledge {str(data.get('knowledge'))[:12]!r}, not the "
                           f"knowledge {knowledge_sha[:12]!r} it is stored with")
        text = {d.name: d.text for d in docs}
        names, rows = data.get("documents"), data.get("passages")
        if not isinstance(names, list) or not isinstance(rows, list) or not all(isinstance(n, str) for n in names):
            raise _refused("its documents or passages are not lists")
        passages = [_row(row, names, text) for row in rows]
        index = cls._of(passages, text, knowledge_sha)
        if data.get("sha256") != _digest(passages, index.texts):
            raise _refused("its passages do not match its digest (the file was edited)")
        return index


def load(manifest: dict, docs: Sequence[Document], knowledge_sha: str) -> PassageIndex:
    """A cache's passage index; made from the documents for caches written before manifests kept one."""
    if "passages" not in manifest:
        return PassageIndex.build(docs, knowledge_sha)
    return PassageIndex.from_json(manifest["passages"], docs, knowledge_sha)


def _row(row: object, names: list[str], text: dict[str, str]) -> Passage:
    ok = isinstance(row, list) and len(row) == 7 and all(type(v) is int for v in row[:3] + row[4:6])
    if not ok or not 0 <= row[0] < len(names) or names[row[0]] not in text:
        raise _refused(f"a passage {str(row)[:80]} does not name a document of this knowledge base")
    doc, start, end, page, first, last, heading = row
    name = names[doc]
    if not 0 <= start < end <= len(text[name]) or not 1 <= first <= last:
        raise _refused(f"a passage of {name!r} at {start}:{end} lies outside the document")
    if not (page is None or type(page) is int) or not isinstance(heading, list) \
            or not all(isinstance(h, str) for h in heading):
        raise _refused(f"a passage of {name!r} has a locator of the wrong type")
    return Passage(name, start, end, tuple(heading), page, (first, last))


def _refused(why: str) -> CacheFileError:
    return CacheFileError(f"passage index refused: {why}")


def _digest(passages: Sequence[Passage], texts: Sequence[str]) -> str:
    rows = [[p.document, p.start, p.end, p.page, list(p.lines), list(p.heading), t] for p, t in zip(passages, texts)]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def shown(text: str) -> str:
    """A passage's text as a snippet: page breaks dropped, whitespace runs folded to one space."""
    return " ".join(text.replace(PAGE_BREAK, " ").split())


# -- splitting ---------------------------------------------------------------------------------------

def split(doc: Document) -> list[Passage]:
    """The passages of one document, in order."""
    suffix = PurePosixPath(doc.name).suffix.lower()
    headed, paged = suffix in HEADED, suffix in PAGED
    text = doc.text
    newlines = [i for i, c in enumerate(text) if c == "\n"]
    breaks = [i for i, c in enumerate(text) if c == PAGE_BREAK] if paged else []
    out: list[Passage] = []
    path: list[tuple[int, str]] = []  # (level, title) of the headings above
    for start, end in _blocks(text, newlines):
        if headed:
            heading = _HEADING.match(text[start:end].split("\n", 1)[0])
            if heading:
                level = len(heading.group(1))
                path = [h for h in path if h[0] < level] + [(level, heading.group(2))]
                rest = text.find("\n", start, end)
                if rest < 0:
                    continue  # a heading alone: it names what follows
                start = rest + 1
        for s, e in _pieces(text, start, end):
            lines = (bisect.bisect_left(newlines, s) + 1, bisect.bisect_left(newlines, e) + 1)
            page = bisect.bisect_right(breaks, s) + 1 if paged else None
            out.append(Passage(doc.name, s, e, tuple(t for _, t in path) if headed else (), page, lines))
    return out


def _blocks(text: str, newlines: list[int]):
    """(start, end) of each run of non-blank lines."""
    start = None
    for line_start, line_end in zip([0] + [n + 1 for n in newlines], newlines + [len(text)]):
        blank = not text[line_start:line_end].replace(PAGE_BREAK, "").strip()
        if not blank and start is None:
            start = line_start
        if blank and start is not None:
            yield start, line_start - 1
            start = None
    if start is not None:
        yield start, len(text)


def _pieces(text: str, start: int, end: int):
    """A block cut into spans of at most MAX_CHARS, each made of whole sentences (or list items, or table
    rows) where they fit; a short last piece joins the one before it while that stays under MERGED_CHARS."""
    pieces: list[list[int]] = []
    for s, e in _units(text, start, end):
        if pieces and e - pieces[-1][0] <= MAX_CHARS:
            pieces[-1][1] = e
        else:
            pieces.append([s, e])
    if len(pieces) > 1 and pieces[-1][1] - pieces[-1][0] < MAX_CHARS // 4 \
            and pieces[-1][1] - pieces[-2][0] <= MERGED_CHARS:
        last = pieces.pop()
        pieces[-1][1] = last[1]
    return [tuple(p) for p in pieces]


def _units(text: str, start: int, end: int):
    """The sentences of a block (a hard-wrapped line runs on into the next), its list items and table rows,
    each cut at word boundaries if longer than MAX_CHARS."""
    s = start
    for m in _BOUNDARY.finditer(text, start, end):
        if m.start() > s:
            yield from _cut(text, s, m.start())
        s = m.end()
    if s < end:
        yield from _cut(text, s, end)


def _cut(text: str, s: int, e: int):
    """A span (without the whitespace around it: a page's form feeds belong to no passage) as runs of whole
    words of at most MAX_CHARS."""
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    while e - s > MAX_CHARS:
        cut = text.rfind(" ", s + 1, s + MAX_CHARS + 1)
        cut = cut if cut > s else s + MAX_CHARS
        yield s, cut
        s = cut
        while s < e and text[s].isspace():
            s += 1
    if s < e:
        yield s, e
