"""Restoring a cache file into memory as one pipeline: each byte is read once, hashed and copied on.

Reading a cache used to be three passes over its bytes: parse the tensors out of the file, hash them,
copy them to the device. Here several threads each take an 8 MiB piece at a time (the checksum's own
pieces, cag.checksum), read it from the file (`os.preadv`) or from bytes already in memory (Redis)
1 MiB at a time, hashing each part while it is still in the core's cache, and move on:

* on the CPU the piece is read straight into the final tensor, so there is nothing left to copy;
* on CUDA it is read into a pinned host buffer and its host-to-device copy is queued on the thread's
  own stream; each thread alternates two buffers, so the copy of one piece runs while the thread reads
  and hashes the next.

The copies to the device run ahead of verification, but nothing is handed out before it: `restore`
returns only after every piece was hashed, every copy finished and the file's digest matched;
otherwise it raises and the tensors it filled are dropped. The header is checked the way safetensors
checks it (known dtypes, sizes that match shapes, tensors that tile the data exactly), so a file that
safetensors refuses is refused here too, before any tensor memory is allocated.
"""

from __future__ import annotations

import ctypes
import hmac
import itertools
import json
import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import CacheFileError
from . import checksum

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
SUB = 1 << 20  # bytes read and hashed at a time: small enough to stay in a core's cache in between


class Source:
    """Where a cache file's bytes come from: `size`, and reads of a range into a CPU uint8 tensor."""

    size: int

    def read(self, offset: int, n: int) -> bytes:
        out = torch.empty(n, dtype=torch.uint8)
        self.readinto(offset, out)
        return out.numpy().tobytes()

    def readinto(self, offset: int, dest: torch.Tensor) -> None:
        raise NotImplementedError


class FileSource(Source):
    """An open file, read with positional reads (no shared file position: any thread reads any piece)."""

    def __init__(self, fd: int):
        self.fd, self.size = fd, os.fstat(fd).st_size

    def readinto(self, offset: int, dest: torch.Tensor) -> None:
        view, got = memoryview(dest.numpy()), 0
        while got < len(view):
            if hasattr(os, "preadv"):
                n = os.preadv(self.fd, [view[got:]], offset + got)
            else:  # platforms without preadv: one extra copy
                data = os.pread(self.fd, len(view) - got, offset + got)
                view[got:got + len(data)] = data
                n = len(data)
            if n == 0:
                raise _Short(f"file ended at byte {offset + got}")
            got += n


class BytesSource(Source):
    """A cache file's bytes already in memory (fetched from Redis)."""

    def __init__(self, data: bytes | bytearray | memoryview):
        self.view = memoryview(data).cast("B")
        self.size = len(self.view)
        with warnings.catch_warnings():  # read-only bytes: only ever read here
            warnings.simplefilter("ignore")
            self.tensor = torch.frombuffer(self.view, dtype=torch.uint8) if self.size else torch.empty(0, dtype=torch.uint8)

    def readinto(self, offset: int, dest: torch.Tensor) -> None:
        if offset + dest.numel() > self.size:
            raise _Short(f"data ends at byte {self.size}")
        if dest.numel():  # a plain memcpy that releases the GIL (torch's copy_ would start its own threads)
            ctypes.memmove(dest.data_ptr(), self.tensor.data_ptr() + offset, dest.numel())


@contextmanager
def open_file(path: str | Path) -> Iterator[FileSource]:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        yield FileSource(fd)
    finally:
        os.close(fd)


class _Short(Exception):
    """The source ended before a piece did."""


@dataclass(frozen=True)
class Spec:
    """One tensor of the file: where its bytes are and what they are."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file
    nbytes: int

    @property
    def header(self) -> bytes:
        return checksum.header(self.name, self.dtype, self.shape)


@dataclass(frozen=True)
class Layout:
    metadata: dict
    tensors: list[Spec]  # in name order (the checksum's order)


def corrupt(where: str, detail: str) -> CacheFileError:
    return CacheFileError(f"cache file {where} is corrupt or truncated ({detail[:160]}); rebuild it")


def layout(source: Source, where: str) -> Layout:
    """The file's header: its metadata and tensors, checked as strictly as safetensors checks them."""
    if source.size < 8:
        raise corrupt(where, f"{source.size} bytes, shorter than a safetensors header")
    n = int.from_bytes(source.read(0, 8), "little")
    if n > MAX_HEADER or 8 + n > source.size:
        raise corrupt(where, f"header of {n} bytes in {source.size}")
    try:
        header = json.loads(source.read(8, n), object_pairs_hook=_unique)
    except (ValueError, UnicodeDecodeError) as err:
        raise corrupt(where, f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise corrupt(where, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt(where, "metadata is not a map of text")
    specs, start = [], 8 + n
    for name, info in header.items():
        spec = _spec(name, info, start)
        if spec is None:
            raise corrupt(where, f"tensor {name!r} is described wrongly")
        specs.append(spec)
    end = start
    for spec in sorted(specs, key=lambda s: (s.offset, s.nbytes)):  # the tensors must tile the data exactly
        if spec.offset != end:
            raise corrupt(where, f"tensor {spec.name!r} does not start where the previous one ends")
        end += spec.nbytes
    if end != source.size:
        raise corrupt(where, f"data ends at byte {end}, file has {source.size}")
    return Layout(metadata, sorted(specs, key=lambda s: s.name))


def _unique(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key appears twice")
    return dict(pairs)


def _spec(name: str, info, start: int) -> Spec | None:
    if not isinstance(info, dict) or info.get("dtype") not in DTYPES:
        return None
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return None
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        return None
    dtype = DTYPES[info["dtype"]]
    begin, end = offsets
    nbytes = math.prod(shape) * dtype.itemsize
    if begin < 0 or end - begin != nbytes:
        return None
    return Spec(name, dtype, tuple(shape), start + begin, nbytes)


def restore(source: Source, lay: Layout, where: str, method: str | None, manifest: dict, expected: str,
            device: torch.device | str = "cpu", host: frozenset[str] = frozenset(),
            threads: int | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the file on `device` (those named in `host` on the CPU), returned only if the
    file's digest by `method` equals `expected`; otherwise CacheFileError, and nothing escapes."""
    device = torch.device(device)
    if method is not None and method not in checksum.PIECEWISE:
        raise failed(where)
    if method is None:  # the first files: one sequential digest, so read everything, then hash in order
        tensors = _fill(source, lay, where, None, torch.device("cpu"), host, threads)[0]
        items = [(s.header, tensors[s.name].reshape(-1).view(torch.uint8).numpy().data) for s in lay.tensors]
        if not hmac.compare_digest(checksum.sequential(items), expected):
            raise failed(where)
        return {k: t if k in host else t.to(device) for k, t in tensors.items()}
    tensors, digests = _fill(source, lay, where, checksum.piece_hasher(method), device, host, threads)
    digest = checksum.combine(method, manifest, [(s.header, digests[s.name]) for s in lay.tensors])
    if not hmac.compare_digest(digest, expected):
        raise failed(where)
    return tensors


def failed(where: str) -> CacheFileError:
    return CacheFileError(f"cache file {where} failed its checksum: it is corrupt or was tampered with; rebuild it")


@dataclass(frozen=True)
class _Piece:
    spec: Spec
    index: int  # of the piece within its tensor
    start: int  # within the tensor's bytes
    length: int


def _fill(source: Source, lay: Layout, where: str, hasher, device: torch.device, host: frozenset[str],
          threads: int | None):
    """Allocate every tensor, read each piece once into it (through pinned buffers for CUDA) and hash it
    as it comes in, a part of SUB bytes at a time, while that part is still in the CPU's cache."""
    tensors, flat = {}, {}
    for spec in lay.tensors:
        at = torch.device("cpu") if spec.name in host else device
        tensors[spec.name] = torch.empty(spec.shape, dtype=spec.dtype, device=at)
        flat[spec.name] = tensors[spec.name].reshape(-1).view(torch.uint8)
    work = [_Piece(spec, i, start, length) for spec in lay.tensors
            for i, (start, length) in enumerate(checksum.pieces(spec.nbytes))]
    digests = {spec.name: [b""] * len(checksum.pieces(spec.nbytes)) for spec in lay.tensors}
    taken, stop = itertools.count(), threading.Event()
    cuda = device.type == "cuda" and any(t.device.type == "cuda" for t in tensors.values())
    if cuda:  # the side streams write only once whatever the current stream queued on this memory is done
        allocated = torch.cuda.Event()
        allocated.record(torch.cuda.current_stream(device))

    def worker() -> None:
        stream = torch.cuda.Stream(device) if cuda else None
        if stream is not None:
            stream.wait_event(allocated)
        buffers = _PINNED.take(2) if cuda else []
        pending: list = [None, None]  # the copy still reading each buffer
        turn = 0
        try:
            while not stop.is_set():
                i = next(taken)  # itertools.count: one piece per call, safe across threads
                if i >= len(work):
                    return
                p = work[i]
                out = flat[p.spec.name][p.start:p.start + p.length]
                on_host = out.device.type == "cpu"
                if not on_host and pending[turn] is not None:
                    pending[turn].synchronize()  # the copy that last read this buffer is done
                staged = out if on_host else buffers[turn][:p.length]
                h = hasher() if hasher is not None else None
                for at in range(0, p.length, SUB):
                    part = staged[at:at + SUB]
                    source.readinto(p.spec.offset + p.start + at, part)
                    if h is not None:
                        h.update(part.numpy())
                if h is not None:
                    digests[p.spec.name][p.index] = h.digest()
                if not on_host:
                    with torch.cuda.stream(stream):
                        out.copy_(staged, non_blocking=True)
                        pending[turn] = torch.cuda.Event()
                        pending[turn].record(stream)
                    turn ^= 1
        except BaseException:
            stop.set()
            raise
        finally:
            if stream is not None:
                stream.synchronize()  # every copy done before the buffers go back or anything is returned
                _PINNED.give(buffers)

    count = max(1, min(len(work), threads or checksum.default_threads()))
    with ThreadPoolExecutor(max_workers=count, thread_name_prefix="cag-restore") as pool:
        runs = [pool.submit(worker) for _ in range(count)]
    try:
        for run in runs:
            run.result()
    except _Short as err:
        raise corrupt(where, str(err)) from None
    except OSError as err:
        raise corrupt(where, f"read failed: {err}") from None
    return tensors, digests


class _Pinned:
    """Pinned host buffers of one piece each, kept for the next restore (pinning memory is slow)."""

    def __init__(self):
        self.free: list[torch.Tensor] = []
        self.lock = threading.Lock()

    def take(self, n: int) -> list[torch.Tensor]:
        with self.lock:
            got, self.free = self.free[:n], self.free[n:]
        return got + [torch.empty(checksum.PIECE, dtype=torch.uint8, pin_memory=True) for _ in range(n - len(got))]

    def give(self, buffers: list[torch.Tensor]) -> None:
        with self.lock:
            self.free.extend(buffers)


_PINNED = _Pinned()
