"""Reading knowledge: files and folders into ordered, normalized documents with one content hash.

Order and normalization are part of the cache's identity: the same files must always give the same
text in the same order, or a cache built yesterday would silently stop matching today's prompt.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .. import paths
from ..cache import atomic
from ..errors import KnowledgeError
from .readers import sandbox

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".csv", ".tsv", ".json", ".jsonl", ".yaml", ".yml", ".log"}
HTML_SUFFIXES = {".html", ".htm"}
PDF_SUFFIXES = {".pdf"}
DOCX_SUFFIXES = {".docx"}
EPUB_SUFFIXES = {".epub"}
SUPPORTED = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES | DOCX_SUFFIXES | EPUB_SUFFIXES

# What one PDF may cost to read (cag/readers enforce them in a child process): a hostile PDF can be
# tiny on disk and still inflate to gigabytes or take minutes to parse.
PDF_MAX_PAGES = 2000
PDF_MAX_STREAM_BYTES = 8_000_000  # any one stream, decompressed
PDF_MAX_BYTES = 64_000_000  # all page content of one file, decompressed
PDF_MAX_SECONDS = 30  # CPU time of the parse (and, with some slack, its wall time)
PDF_MAX_MEMORY = 2 << 30  # address space of the parsing process

# What one HTML, .docx or .epub file may cost to read (enforced the same way): a .docx or .epub is a zip,
# and a few KB of zip can claim gigabytes; markup can be built to be slow.
HTML_MAX_BYTES = 10_000_000  # one HTML file (converting it runs at about 0.5 MB/s)
ZIP_MAX_ENTRIES = 10_000  # files inside one .docx/.epub
ZIP_MAX_BYTES = 256_000_000  # all of them together, uncompressed, as their entries declare
DOC_MAX_SECONDS = 30  # CPU time of the parse (and, with some slack, its wall time)
DOC_MAX_MEMORY = 2 << 30  # address space of the parsing process


@dataclass(frozen=True)
class Document:
    name: str  # shown to the model as the document's title; relative to the folder it came from
    text: str


def load(sources: Iterable[str | Path], log: Callable[[str], None] | None = None) -> list[Document]:
    """Load every source (file or folder, recursively) in a stable order; refuse missing or empty input.

    Files of an unsupported type inside a folder are left out, and `log` gets one line naming them."""
    docs: list[Document] = []
    for source in sources:
        path = Path(source).expanduser()
        if not path.exists():
            raise KnowledgeError(f"knowledge path not found: {path}")
        if path.is_dir():
            visible = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
            files = [p for p in visible if p.suffix.lower() in SUPPORTED]
            skipped = [p.relative_to(path).as_posix() for p in visible if p.suffix.lower() not in SUPPORTED]
            if skipped and log is not None:
                shown = ", ".join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
                log(f"{path}: skipped {len(skipped)} file(s) of unsupported type: {shown} "
                    f"(supported: {', '.join(sorted(SUPPORTED))})")
            if not files:
                raise KnowledgeError(
                    f"folder {path} holds no readable documents (supported: {', '.join(sorted(SUPPORTED))})"
                )
            docs.extend(Document(p.relative_to(path).as_posix(), read_file(p)) for p in files)
        else:
            if path.suffix.lower() not in SUPPORTED:
                raise KnowledgeError(
                    f"unsupported file type {path.suffix or '(none)'} for {path} "
                    f"(supported: {', '.join(sorted(SUPPORTED))})"
                )
            docs.append(Document(path.name, read_file(path)))
    docs = [d for d in docs if d.text]
    if not docs:
        raise KnowledgeError("the knowledge base is empty: every document had no text")
    return docs


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def read_file(path: Path) -> str:
    """One file's normalized text; PDF, HTML, .docx and .epub are parsed in a child process held to limits
    (once per distinct file content: see _parsed)."""
    suffix = path.suffix.lower()
    if suffix in PDF_SUFFIXES:
        text = _parsed("pdf", path, [PDF_MAX_PAGES, PDF_MAX_BYTES, PDF_MAX_STREAM_BYTES], PDF_MAX_MEMORY,
                       PDF_MAX_SECONDS, "PDF")
    elif suffix in HTML_SUFFIXES:
        text = _parsed("html", path, [HTML_MAX_BYTES], DOC_MAX_MEMORY, DOC_MAX_SECONDS, "HTML file")
    elif suffix in DOCX_SUFFIXES | EPUB_SUFFIXES:
        text = _parsed(suffix[1:], path, [ZIP_MAX_ENTRIES, ZIP_MAX_BYTES], DOC_MAX_MEMORY, DOC_MAX_SECONDS,
                       f"{suffix} file")
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise KnowledgeError(f"{path} is not UTF-8 text; convert it or remove it") from None
        except OSError as err:
            raise KnowledgeError(f"cannot read {path}: {err.strerror or err}") from None
    return normalize(text)


EXTRACTED_VERSION = 2  # 2: PDF pages start with form feeds. Bump when a reader's output changes: earlier extractions are then ignored


def _parsed(fmt: str, path: Path, limits: list[int], memory: int, seconds: int, label: str) -> str:
    """The reader's text for this file's bytes, parsed once: every load of a knowledge base re-reads its
    sources to notice changes, and a child process per PDF, page or document on every `cag ask` would make
    a folder of hundreds of them slow. Extractions are kept in CAG_HOME/extracted by the sha256 of the
    file's bytes, reader and limits (a changed file, reader or limit parses afresh)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise KnowledgeError(f"cannot read {path}: {err.strerror or err}") from None
    key = hashlib.sha256(data + json.dumps([fmt, limits, memory, seconds, EXTRACTED_VERSION]).encode()).hexdigest()
    stored = paths.home() / "extracted" / key[:2] / f"{key}.txt"
    try:
        return stored.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        pass
    text = sandbox.read(fmt, path, limits, memory, seconds, label)
    try:
        atomic.write_text(stored, text)
    except OSError:
        pass  # a read-only home still reads its knowledge, only more slowly
    return text


def normalize(text: str) -> str:
    """NFC, Unix newlines, no trailing spaces, no leading/trailing blank lines."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def content_hash(docs: Iterable[Document]) -> str:
    return hashlib.sha256(json.dumps([[d.name, d.text] for d in docs], ensure_ascii=False).encode()).hexdigest()


def to_json(docs: Iterable[Document]) -> list[dict]:
    return [{"name": d.name, "text": d.text} for d in docs]


def from_json(items: list[dict]) -> list[Document]:
    return [Document(i["name"], i["text"]) for i in items]
