"""Hostile PDFs: a decompression bomb, too many pages, content built to be slow. Each is refused with a
KnowledgeError naming the file and the limit, by the limit meant for it (not by running until done)."""

from __future__ import annotations

import pytest

from cag.kb import knowledge
from cag.errors import KnowledgeError
from pdfutil import TEXT, bomb, write_pdf


def test_a_normal_pdf_still_reads(tmp_path):
    path = write_pdf(tmp_path / "guide.pdf", [TEXT, b"BT /F1 12 Tf 72 720 Td (Second page.) Tj ET"])
    # each page after the first starts with a form feed: how a source names its page (cag.kb.passages)
    assert knowledge.read_file(path) == "The Heron lantern costs 148 crowns.\n\n\fSecond page."


def test_decompression_bomb_is_refused_by_the_stream_limit(tmp_path):
    path = bomb(tmp_path / "bomb.pdf", megabytes=12)
    assert path.stat().st_size < 50_000
    with pytest.raises(KnowledgeError, match=rf"bomb\.pdf: a stream in it decompresses to more than "
                                             rf"{knowledge.PDF_MAX_STREAM_BYTES} bytes"):
        knowledge.load([tmp_path])


def test_too_many_pages_are_refused(tmp_path):
    path = write_pdf(tmp_path / "long.pdf", [TEXT], pages=knowledge.PDF_MAX_PAGES + 1)
    with pytest.raises(KnowledgeError, match=rf"long\.pdf: it has {knowledge.PDF_MAX_PAGES + 1} pages; at most "
                                             rf"{knowledge.PDF_MAX_PAGES} are read"):
        knowledge.read_file(path)


def test_page_content_per_file_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(knowledge, "PDF_MAX_BYTES", 3 * len(TEXT))
    path = write_pdf(tmp_path / "many.pdf", [TEXT], pages=4)  # each page alone is tiny; four are over the cap
    with pytest.raises(KnowledgeError, match=r"many\.pdf: its page content decompresses to more than \d+ bytes by "
                                             r"page 4"):
        knowledge.read_file(path)


def test_slow_content_is_stopped_by_the_time_limit(tmp_path, monkeypatch):
    # ~3.5 MB of text operators: under every size limit, but seconds of parsing
    path = write_pdf(tmp_path / "slow.pdf", [b"BT /F1 12 Tf " + b"(A) Tj " * 500_000 + b"ET"])
    monkeypatch.setattr(knowledge, "PDF_MAX_SECONDS", 1)
    with pytest.raises(KnowledgeError, match=r"slow\.pdf: parsing it took more than 1 s"):
        knowledge.read_file(path)


def test_a_broken_pdf_names_the_file(tmp_path):
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.4\nthis is not a pdf at all")
    with pytest.raises(KnowledgeError, match=r"broken\.pdf"):
        knowledge.read_file(path)
