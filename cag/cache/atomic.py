"""Crash-safe writes: readers see the old file or the new one, never half of either."""

from __future__ import annotations

import glob
import os
import re
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


try:
    import fcntl
except ImportError:  # no flock on this platform: writers of one folder are not serialized
    fcntl = None


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it, rename it over `path` and fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"
FOREIGN_STALE_S = 24 * 3600  # a temp file of another machine (shared folder) counts as abandoned after this


def clean_stale(path: Path) -> list[Path]:
    """Remove temp files that writers of `path` left behind when killed mid-write (kill -9, power loss).

    A temp file names its writer's host and process id: on this host it is stale once that process is
    gone; one from another host (a shared CAG_HOME) or from before names carried the writer once it has not
    been touched for a day. A live writer's file is never removed."""
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        m = re.fullmatch(rf"\.{re.escape(path.name)}\.(.+)-(\d+)\.[^.]+\.tmp", tmp.name)
        try:
            if m and m.group(1) == _HOST:
                stale = not _alive(int(m.group(2)))
            else:
                stale = time.time() - tmp.stat().st_mtime > FOREIGN_STALE_S
            if stale:
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            pass  # gone already, or not ours to remove
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def write_text(path: str | Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not every platform can open a folder
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold `folder`'s writer lock (flock on the folder itself): one writer at a time, across processes. A
    writer killed while holding it lets go with its process, so no lock is ever left behind. Where the file
    system cannot lock (some network mounts), writers go on unserialized, as they did before."""
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock
