"""Model files: their fingerprints (sha256, memoized by path, size and modification time), and writes
through safetensors that report a failed write as the OSError it is.

Why memoize: a cache is tied to the exact model file it was made with, so every load hashes the weights;
a 4 GB GGUF takes seconds to hash, and it rarely changes. The memo lives under CAG_HOME/models; a
changed size or mtime means hashing again, and a read-only home only costs re-hashing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError

from .. import paths

_LOCK = threading.Lock()


def file_sha256(f: Path) -> str:
    """The sha256 of file `f`, from the memo when its path, size and mtime are unchanged."""
    real = Path(f).resolve()
    st = real.stat()
    memo_path = paths.models_dir() / "fingerprints.json"
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    with _LOCK:
        memo = _read(memo_path)
        if key in memo:
            return memo[key]
    h = hashlib.sha256()
    with open(real, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 23), b""):
            h.update(block)
    with _LOCK:
        memo = _read(memo_path)
        memo[key] = h.hexdigest()
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_path)
        except OSError:
            pass  # a read-only home only costs re-hashing next time
    return memo[key]


def _read(memo_path: Path) -> dict:
    try:
        found = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


_OS_ERROR = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")


@contextmanager
def os_errors(path: str | Path) -> Iterator[None]:
    """Writes through safetensors: it reports a failed write (a full disk, a quota, a file size limit) as a
    SafetensorError naming the OS error; raise it as that OSError, naming `path`, so it is the user's to fix
    like any other failed write. Any other SafetensorError is left as it is."""
    try:
        yield
    except SafetensorError as err:
        found = _OS_ERROR.search(str(err))
        if found is None:
            raise
        code = int(found.group(1) or found.group(2))
        raise OSError(code, os.strerror(code), str(path)) from None
