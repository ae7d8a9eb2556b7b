"""Reading knowledge: files and folders into ordered, normalized documents with one content hash.

Order and normalization are part of the cache's identity: the same files must always give the same
text in the same order, or a cache built yesterday would silently stop matching today's prompt.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .errors import KnowledgeError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".csv", ".tsv", ".json", ".jsonl", ".yaml", ".yml", ".log"}
HTML_SUFFIXES = {".html", ".htm"}
PDF_SUFFIXES = {".pdf"}
SUPPORTED = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES

# What one PDF may cost to read (cag/pdftext.py enforces them in a child process): a hostile PDF can be
# tiny on disk and still inflate to gigabytes or take minutes to parse.
PDF_MAX_PAGES = 2000
PDF_MAX_STREAM_BYTES = 8_000_000  # any one stream, decompressed
PDF_MAX_BYTES = 64_000_000  # all page content of one file, decompressed
PDF_MAX_SECONDS = 30  # CPU time of the parse (and, with some slack, its wall time)
PDF_MAX_MEMORY = 2 << 30  # address space of the parsing process


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
    suffix = path.suffix.lower()
    try:
        if suffix in PDF_SUFFIXES:
            text = read_pdf(path)
        elif suffix in HTML_SUFFIXES:
            import html2text

            converter = html2text.HTML2Text()
            converter.body_width = 0  # no hard wrapping: it would waste tokens
            text = converter.handle(path.read_text(encoding="utf-8", errors="replace"))
        else:
            text = path.read_text(encoding="utf-8")
    except KnowledgeError:
        raise
    except UnicodeDecodeError:
        raise KnowledgeError(f"{path} is not UTF-8 text; convert it or remove it") from None
    except OSError as err:
        raise KnowledgeError(f"cannot read {path}: {err.strerror or err}") from None
    except Exception as err:  # noqa: BLE001 - PDF/HTML parsers raise many types
        raise KnowledgeError(f"cannot parse {path}: {err}") from None
    return normalize(text)


def read_pdf(path: Path) -> str:
    """The PDF's text, parsed in a child process held to the PDF_MAX_* limits; KnowledgeError names the limit."""
    from . import pdftext

    limits = [PDF_MAX_PAGES, PDF_MAX_BYTES, PDF_MAX_STREAM_BYTES, PDF_MAX_MEMORY, PDF_MAX_SECONDS]
    slow = KnowledgeError(f"refused to read {path}: parsing it took more than {PDF_MAX_SECONDS} s (the limit per "
                          "PDF); it may be malformed or built to be slow")
    try:
        done = subprocess.run([sys.executable, "-I", pdftext.__file__, str(path), *map(str, limits)],
                              capture_output=True, timeout=2 * PDF_MAX_SECONDS + 10, check=False)
    except subprocess.TimeoutExpired:
        raise slow from None
    reason = (done.stderr.decode("utf-8", errors="replace").strip().splitlines() or ["no reason given"])[-1]
    if done.returncode == pdftext.REFUSED:
        raise KnowledgeError(f"refused to read {path}: {reason}")
    if done.returncode in (-getattr(signal, "SIGXCPU", 24), -getattr(signal, "SIGKILL", 9)):
        raise slow
    if done.returncode != 0:
        raise KnowledgeError(f"cannot parse {path}: {reason}")
    return done.stdout.decode("utf-8")


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
