"""Disk tier: the kvfile format under CAG_HOME/kbs/NAME/.

    cache.safetensors   the KV cache (verified file format)
    kb.json             settings (sources, model, instruction, policy, built_at)
    knowledge.json      the knowledge text at build time
    tenant.json         the owner, for knowledge bases created through the server (absent: built by the CLI)
    version.json        the published version, when one was published
    stats.json          hit counter

It is what makes a restart cheap: a new process finds the cache here and answers without prefill.
Dropping a cache keeps the rest, so the knowledge base can still be rebuilt; removing it deletes the
folder (with whatever else lives there, such as a server-created knowledge base's documents).
A sidecar that cannot be read (edited by hand, written by something else) makes its knowledge base
missing, with a logged warning, rather than an error for every listing: a damaged kb.json or
tenant.json means no record (never a record without its owner), a damaged knowledge.json no entry.

A build commits as one step. Its records (kb.json, knowledge.json, tenant.json) are first staged in
`.staged/`, with `commit.json` naming the cache file they replace; renaming the new cache into place is
the commit; then the records are moved in and the staging folder removed. A reader takes a sidecar from
`.staged/` once the cache in the folder is no longer the one the staged records replace (the build
committed and its records are on their way in), else from the folder itself. So at every instant, a kill
-9 or a full disk included, a reader sees the previous version whole or the new one whole. The next writer
of the folder (one at a time: atomic.exclusive) finishes a committed staging that a killed build left, or
discards one whose cache never landed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from ... import paths
from .. import atomic, kvfile
from ..kvfile import KV, Expect
from .base import (
    Entry,
    Record,
    Store,
    Tombstone,
    checked_number,
    checked_record,
    checked_snapshot,
    damaged,
    loads,
    save_file,
    valid_name,
)

CACHE_FILE, KB_FILE, SNAPSHOT_FILE, STATS_FILE = "cache.safetensors", "kb.json", "knowledge.json", "stats.json"
TENANT_FILE, VERSION_FILE = "tenant.json", "version.json"
STAGED_DIR, COMMIT_FILE = ".staged", "commit.json"  # a build's records until its cache has landed
RECORD_FILES = (SNAPSHOT_FILE, TENANT_FILE, KB_FILE)  # what a build stages, in the order they are moved in


class DiskStore(Store):
    name = "disk"
    persistent = True
    shared = False

    def __init__(self, root: Path | None = None):
        self.root = root  # None: CAG_HOME/kbs, read at each call (tests point CAG_HOME elsewhere)

    def folder(self, name: str) -> Path:
        folder = paths.kb_dir(name)  # checks the name
        return self.root / name if self.root is not None else folder

    # -- the KV cache ------------------------------------------------------------------------------
    def get(self, name: str, expect: Expect, device: torch.device | str) -> Entry | None:
        folder = self.folder(name)
        if not (folder / CACHE_FILE).is_file():
            return None
        record, snapshot = self.record(name), self.snapshot(name)
        if record is None or snapshot is None:
            return None
        loaded = kvfile.load(folder / CACHE_FILE, expect, device=device)
        self._count_hit(folder)
        return Entry.loaded(name, loaded, record, snapshot)

    def put(self, entry: Entry) -> dict:
        """Stage the records, rename the cache into place (the commit), move the records in (module docstring).
        A failure before the commit leaves the previous version as it was."""
        folder = self.folder(entry.name)
        with atomic.exclusive(folder):
            self._settle(folder)
            try:
                self._stage(folder, entry.record, entry.snapshot, {"replaces": file_id(folder / CACHE_FILE)})
                manifest = save_file(folder / CACHE_FILE, entry)
            finally:
                self._settle(folder)  # committed: move the records in; not: forget them
        return manifest

    def drop(self, name: str) -> bool:
        folder = self.folder(name)
        if not folder.is_dir():
            return False
        with atomic.exclusive(folder):
            self._settle(folder)  # a killed build's committed records first: they go with the cache they describe
            path = folder / CACHE_FILE
            existed = path.is_file()
            path.unlink(missing_ok=True)
        return existed

    def has(self, name: str) -> bool:
        return self.file(name).is_file()

    def file(self, name: str) -> Path:
        """Where the cache file of `name` is (or would be) kept."""
        return self.folder(name) / CACHE_FILE

    def share(self, name: str, layers: KV) -> None:
        """Nothing: this tier holds a file, which is what outlives the process."""

    def info(self, name: str) -> dict | None:
        path = self.folder(name) / CACHE_FILE
        if not path.is_file():
            return None
        manifest = kvfile.read_manifest(path)
        return {"bytes": path.stat().st_size, "tokens": manifest.get("tokens"), "created": manifest.get("created"),
                "hits": self._hits(path.parent)}

    # -- the record --------------------------------------------------------------------------------
    def record(self, name: str) -> Record | None:
        folder = self.folder(name)
        try:
            meta = loads(_read(folder, KB_FILE))
            owner = _owner(folder)
            return checked_record(name, meta, owner)
        except FileNotFoundError:
            return None  # no kb.json: not (or no longer) a knowledge base here
        except (OSError, ValueError) as err:
            damaged(name, f"record in {folder}", str(err))
            return None

    def snapshot(self, name: str) -> list[dict] | None:
        path = self.folder(name) / SNAPSHOT_FILE
        try:
            return checked_snapshot(loads(_read(path.parent, SNAPSHOT_FILE)))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            damaged(name, f"knowledge text {path}", str(err))
            return None

    def put_record(self, record: Record, snapshot: list[dict]) -> None:
        """Records alone (no cache goes with them): staged, committed by writing commit.json, moved in."""
        folder = self.folder(record.name)
        with atomic.exclusive(folder):
            self._settle(folder)
            try:
                self._stage(folder, record, snapshot, {"records_only": True})
            finally:
                self._settle(folder)

    def names(self) -> list[str]:
        root = self.root or paths.kbs_dir()
        if not root.is_dir():
            return []
        return sorted(f.name for f in root.iterdir() if valid_name(f.name) and _exists(f, KB_FILE))

    # -- committing a build as one step (module docstring) -------------------------------------------
    def _stage(self, folder: Path, record: Record, snapshot: list[dict], commit: dict) -> None:
        """Write a build's records into the staging folder, commit.json last (with records only, the commit)."""
        staged = folder / STAGED_DIR
        staged.mkdir()
        atomic.fsync_dir(folder)
        atomic.write_text(staged / SNAPSHOT_FILE, json.dumps(snapshot, ensure_ascii=False))
        atomic.write_text(staged / TENANT_FILE, json.dumps({"tenant": record.owner}))  # null: built by the CLI
        atomic.write_text(staged / KB_FILE, json.dumps(record.meta, indent=2))
        atomic.write_text(staged / COMMIT_FILE, json.dumps(commit))

    def _settle(self, folder: Path) -> None:
        """Finish what a writer left in the staging folder (the caller holds the writer lock): move committed
        records in, one by one (a reader finds each in one place or the other, the new version in both), or
        remove records whose cache never landed."""
        staged = folder / STAGED_DIR
        if not staged.exists():
            return
        if _committed(folder):
            for name in RECORD_FILES:
                source = staged / name
                if not source.exists():
                    continue  # moved in before a kill
                if name == TENANT_FILE and _tenant(source.read_bytes()) is None:
                    (folder / TENANT_FILE).unlink(missing_ok=True)  # built by the CLI: no owner file
                    source.unlink()
                else:
                    os.replace(source, folder / name)
            atomic.fsync_dir(folder)
        shutil.rmtree(staged)

    # -- version and deletion ----------------------------------------------------------------------
    def version(self, name: str) -> int | None:
        path = self.folder(name) / VERSION_FILE
        try:
            found = loads(path.read_bytes())
            return checked_number(found.get("version") if isinstance(found, dict) else found, whole=True)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            damaged(name, f"published version {path}", str(err))
            return None

    def set_version(self, name: str, version: int) -> None:
        atomic.write_text(self.folder(name) / VERSION_FILE, json.dumps({"version": int(version), "at": time.time()}))

    def remove(self, name: str, tombstone: Tombstone | None = None) -> bool:
        folder = self.folder(name)
        if not folder.exists():
            return False
        shutil.rmtree(folder)
        return True

    # -- plumbing ----------------------------------------------------------------------------------
    def _hits(self, folder: Path) -> int:
        """The hit counter; a damaged one counts from 0 again."""
        path = folder / STATS_FILE
        try:
            found = loads(path.read_bytes())
            return checked_number(found.get("hits") if isinstance(found, dict) else found, whole=True)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as err:
            damaged(folder.name, f"hit counter {path}", str(err))
            return 0

    def _count_hit(self, folder: Path) -> None:
        try:
            stats = {"hits": self._hits(folder) + 1, "last_hit": time.time()}
            atomic.write_text(folder / STATS_FILE, json.dumps(stats))
        except OSError:
            pass  # a read-only home still answers; only the counter is lost


def _owner(folder: Path) -> object:
    """The owner in tenant.json (None without one: built by the CLI). Unreadable, it raises ValueError: a
    damaged sidecar must not turn a tenant's knowledge base into one every tenant may see."""
    try:
        return _tenant(_read(folder, TENANT_FILE))
    except FileNotFoundError:
        return None


def _tenant(raw: bytes) -> object:
    found = loads(raw)
    if not isinstance(found, dict) or "tenant" not in found:
        raise ValueError(f"{TENANT_FILE} names no tenant")
    return found["tenant"]


def file_id(path: Path) -> list[int] | None:
    """Which file `path` is now (device and inode), or None when there is none. A cache renamed into place is
    the file its temp file was, never the one it replaced (both existed at once); writing into a file in
    place, or touching it, does not change which file it is."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_dev, st.st_ino]


def _committed(folder: Path) -> bool:
    """Whether the staged records are the current version: records alone once commit.json is there; with a
    cache, once the cache in the folder is no longer the one they were staged to replace."""
    try:
        commit = loads((folder / STAGED_DIR / COMMIT_FILE).read_bytes())
    except (OSError, ValueError):
        return False  # none, or not written whole: the build did not commit
    if not isinstance(commit, dict):
        return False
    if commit.get("records_only") is True:
        return True
    live = file_id(folder / CACHE_FILE)
    return live is not None and "replaces" in commit and live != commit["replaces"]


def _read(folder: Path, name: str) -> bytes:
    """The bytes of sidecar `name` as of now: the staged copy while a committed build moves its records in,
    else the folder's own (FileNotFoundError when neither has one)."""
    staged = folder / STAGED_DIR / name
    if staged.parent.is_dir() and _committed(folder):
        try:
            return staged.read_bytes()
        except FileNotFoundError:
            pass  # moved in meanwhile
    return (folder / name).read_bytes()


def _exists(folder: Path, name: str) -> bool:
    return (folder / name).is_file() or ((folder / STAGED_DIR / name).is_file() and _committed(folder))
