"""A PDF's text, extracted under limits in a child process that cag.knowledge starts for each PDF.

    python -I pdftext.py FILE MAX_PAGES MAX_BYTES MAX_STREAM_BYTES MAX_MEMORY_BYTES MAX_CPU_SECONDS

A PDF can be built to cost far more than its size: a 40 KB file can hold a stream that inflates to
gigabytes, or content that takes minutes to parse. Here the kernel caps the child's memory and CPU time
(setrlimit), pypdf's own limits cap every stream's decompressed size, and this script caps the pages and
the page content decompressed per file. On success the text goes to stdout (UTF-8); a refusal is one
line on stderr and exit status 3. Only the standard library and pypdf are imported (no cag, no torch),
so the child starts in a fraction of a second.
"""

from __future__ import annotations

import sys

REFUSED = 3  # exit status of a refusal; its reason is the last line of stderr


def _refuse(reason: str) -> None:
    sys.stderr.write(reason + "\n")
    sys.exit(REFUSED)


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
                _refuse(f"it has {pages} pages; at most {max_pages} are read per PDF")
            texts, total = [], 0
            for number, page in enumerate(reader.pages, 1):
                total += _content_bytes(page)
                if total > max_bytes:
                    _refuse(f"its page content decompresses to more than {max_bytes} bytes by page {number} "
                            f"(at most {max_bytes} are read per PDF)")
                texts.append(page.extract_text() or "")
        except LimitReachedError as err:
            if "decompress" in str(err).lower():
                _refuse(f"a stream in it decompresses to more than {max_stream} bytes (the limit per stream)")
            _refuse(f"it passes one of pypdf's safety limits: {err}")
        except MemoryError:
            _refuse("it needs more memory than a PDF may use")
        except Exception as err:  # noqa: BLE001 - a malformed PDF raises many types; say which, exit 1
            sys.stderr.write(f"{type(err).__name__}: {err}\n")
            sys.exit(1)
    return "\n\n".join(texts)


def main(argv: list[str]) -> None:
    path = argv[1]
    max_pages, max_bytes, max_stream, memory, seconds = (int(a) for a in argv[2:7])
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 1))  # SIGXCPU, then SIGKILL
    except (ImportError, ValueError, OSError):  # no setrlimit here (Windows): the parent's timeout still holds
        pass
    text = extract(path, max_pages, max_bytes, max_stream)
    sys.stdout.buffer.write(text.encode("utf-8", errors="replace"))


if __name__ == "__main__":
    main(sys.argv)
