"""A PDF's text under limits (run by child.py, whose kernel limits cap memory and CPU time).

A PDF can be built to cost far more than its size: a 40 KB file can hold a stream that inflates to
gigabytes. pypdf's own limits cap every stream's decompressed size, and this module caps the pages and the
page content decompressed per file.
"""

from __future__ import annotations

from refusal import Refused


def _content_bytes(page) -> int:
    """Decompressed size of the page's content streams (pypdf keeps the decoded data for extract_text)."""
    from pypdf.generic import ArrayObject

    contents = page.get("/Contents")
    if contents is None:
        return 0
    contents = contents.get_object()
    streams = contents if isinstance(contents, ArrayObject) else [contents]
    return sum(len(s.get_object().get_data()) for s in streams)


def extract(path: str, max_pages: int, max_bytes: int, max_stream: int) -> str:
    from pypdf import PdfReader, apply_configuration
    from pypdf.errors import LimitReachedError

    limits = {key: max_stream for key in ("zlib_maximum_output_length", "lzw_maximum_output_length",
                                          "run_length_maximum_output_length", "brotli_maximum_output_length",
                                          "array_based_stream_maximum_output_length")}
    with apply_configuration(**limits):
        try:
            reader = PdfReader(path)
            pages = len(reader.pages)
            if pages > max_pages:
                raise Refused(f"it has {pages} pages; at most {max_pages} are read per PDF")
            texts, total = [], 0
            for number, page in enumerate(reader.pages, 1):
                total += _content_bytes(page)
                if total > max_bytes:
                    raise Refused(f"its page content decompresses to more than {max_bytes} bytes by page {number} "
                                  f"(at most {max_bytes} are read per PDF)")
                texts.append(page.extract_text() or "")
        except LimitReachedError as err:
            if "decompress" in str(err).lower():
                raise Refused(f"a stream in it decompresses to more than {max_stream} bytes (the limit per stream)") \
                    from None
            raise Refused(f"it passes one of pypdf's safety limits: {err}") from None
    return _paged(texts)


def _paged(texts: list[str]) -> str:
    """The pages' texts, each page after the first starting with a form feed (one per page since the last
    page with text): how a passage knows its page (cag.kb.passages). The form feed opens the page's first
    line, so the normalization that strips line ends keeps it."""
    out, breaks = texts[0] if texts else "", 0
    for text in texts[1:]:
        breaks += 1
        if text.strip():
            out += "\n\n" + "\f" * breaks + text.lstrip()
            breaks = 0
    return out
