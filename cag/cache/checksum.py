"""How a cache file's digest is computed: every tensor in 8 MiB pieces, each piece hashed on its own
(in parallel threads: hashlib and blake3 release the GIL), then one hash over the tensors' headers and
their pieces' digests.

Methods (the manifest's "checksum" field):

    blake3-pieces+manifest   BLAKE3 pieces; the outer hash also covers the manifest (new files, when the
                             blake3 package is installed: ~5 GB/s a thread against SHA-256's ~1.4)
    sha256-pieces+manifest   the same with SHA-256 (new files without blake3, and earlier files)
    sha256-pieces            SHA-256 pieces, the manifest not covered (earlier files)
    absent                   one sequential SHA-256 over headers and bytes (the first files)

Only cryptographic hashes, never a CRC or xxhash: with CAG_SIGNING_KEY the HMAC signs the manifest,
digest included, so a tampered file would need a second preimage of the piece hash to pass. The
pieces depend only on each tensor's length, never on how many threads hash them, so one digest
comes out of any thread count and out of every reader (cag.restore reads a file piece by piece,
kvfile.save hashes tensors already in memory).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Sequence

from ..errors import CacheFileError

try:
    import blake3 as _blake3
except ImportError:  # optional at run time: files then get sha256 pieces
    _blake3 = None

PIECE = 8 << 20
BLAKE3 = "blake3-pieces+manifest"
SHA256 = "sha256-pieces+manifest"
SHA256_TENSORS = "sha256-pieces"  # earlier files: tensor pieces only
PIECEWISE = (BLAKE3, SHA256, SHA256_TENSORS)
NOT_COVERED = ("tensors_sha256", "signature")  # manifest fields the digest cannot cover (it is one of them)


def default_method() -> str:
    """What new files are written with: BLAKE3 where the package is installed, else SHA-256."""
    return BLAKE3 if _blake3 is not None else SHA256


def piece_hasher(method: str) -> Callable:
    """A new hasher (`update`, `digest`) for one piece, for a piecewise `method`; called with bytes, it
    hashes them at once. Feeding a piece in parts gives the same digest (cag.restore hashes as it reads)."""
    if method == BLAKE3:
        if _blake3 is None:
            raise CacheFileError("this cache file has a BLAKE3 checksum and the blake3 package is not installed: "
                                 "`pip install blake3`, or rebuild the cache here")
        return _blake3.blake3
    return hashlib.sha256


def pieces(nbytes: int) -> list[tuple[int, int]]:
    """(start, length) of each piece of a tensor of `nbytes` (an empty tensor has one empty piece)."""
    return [(start, min(PIECE, nbytes - start)) for start in range(0, max(nbytes, 1), PIECE)]


def header(name: str, dtype, shape: Sequence[int]) -> bytes:
    """What identifies a tensor in the digest besides its bytes; `dtype` is a torch dtype."""
    return f"{name}|{dtype}|{list(shape)}|".encode()


def combine(method: str, manifest: dict | None, tensors: Iterable[tuple[bytes, Sequence[bytes]]]) -> str:
    """The file's digest from (header, piece digests) per tensor, in name order."""
    h = _blake3.blake3() if method == BLAKE3 else hashlib.sha256()
    if method in (BLAKE3, SHA256):
        body = {k: v for k, v in (manifest or {}).items() if k not in NOT_COVERED}
        h.update(json.dumps(body, sort_keys=True).encode() + b"|")
    for head, digests in tensors:
        h.update(head)
        for d in digests:
            h.update(d)
    return h.hexdigest()


def sequential(tensors: Iterable[tuple[bytes, object]]) -> str:
    """The first files' digest: one SHA-256 over every (header, bytes) in name order."""
    h = hashlib.sha256()
    for head, data in tensors:
        h.update(head)
        h.update(data)
    return h.hexdigest()


def of_buffers(method: str | None, manifest: dict | None, tensors: Sequence[tuple[bytes, memoryview]],
               threads: int | None = None) -> str:
    """The digest of tensors already in memory: (header, bytes) per tensor in name order.

    An unknown method gives "" (it never matches a stored digest, so the file is refused)."""
    if method is None:
        return sequential(tensors)
    if method not in PIECEWISE:
        return ""
    new = piece_hasher(method)
    flat = [data[s:s + n] for _, data in tensors for s, n in pieces(len(data))]
    with ThreadPoolExecutor(max_workers=max(1, min(len(flat), threads or default_threads()))) as pool:
        digests = iter(pool.map(lambda data: new(data).digest(), flat))
        return combine(method, manifest, [(head, [next(digests) for _ in pieces(len(data))])
                                          for head, data in tensors])


def default_threads() -> int:
    return min(os.cpu_count() or 1, 32)
