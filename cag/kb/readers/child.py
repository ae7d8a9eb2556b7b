"""One document's text, read in this process under kernel limits; cag/readers/sandbox.py starts it per file.

    python -I child.py FORMAT FILE MAX_MEMORY_BYTES MAX_CPU_SECONDS [LIMIT ...]

A document can be built to cost far more than its size: a 40 KB PDF or .docx can inflate to gigabytes, and
markup can be built to take minutes to parse. Here the kernel caps this process's memory and CPU time
(setrlimit) before any parser is imported, and the reader for FORMAT enforces the LIMITs that belong to
it (pages, bytes, zip entries). On success the text goes to stdout (UTF-8); a refusal is one line on
stderr and exit status REFUSED; any other failure is one line naming the error, and exit status 1.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

REFUSED = 3  # exit status of a refusal; its reason is the last line of stderr
READERS = {"pdf": "pdftext", "html": "htmltext", "docx": "docxtext", "epub": "epubtext"}


def _limit_resources(memory: int, seconds: int) -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 1))  # SIGXCPU, then SIGKILL
    except (ImportError, ValueError, OSError):  # no setrlimit here (Windows): the parent's timeout still holds
        pass


def main(argv: list[str]) -> None:
    fmt, path, memory, seconds = argv[1], argv[2], int(argv[3]), int(argv[4])
    limits = [int(a) for a in argv[5:]]
    _limit_resources(memory, seconds)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the readers import each other by plain name
    from refusal import Refused

    try:
        text = importlib.import_module(READERS[fmt]).extract(path, *limits)
    except Refused as err:
        sys.stderr.write(f"{err}\n")
        sys.exit(REFUSED)
    except MemoryError:
        sys.stderr.write(f"it needs more than {memory} bytes of memory to read (the limit per file)\n")
        sys.exit(REFUSED)
    except Exception as err:  # noqa: BLE001 - a malformed file raises many types; say which on one line, exit 1
        sys.stderr.write(f"{type(err).__name__}: {' '.join(str(err).split())}\n")
        sys.exit(1)
    sys.stdout.buffer.write(text.encode("utf-8", errors="replace"))


if __name__ == "__main__":
    main(sys.argv)
