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
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .. import atomic, kvfile
from ... import paths
from ..kvfile import KV, Expect
from .base import Entry, Record, Store, Tombstone, checked_number, checked_record, checked_snapshot, damaged, loads, \
    save_file, valid_name

CACHE_FILE, KB_FILE, SNAPSHOT_FILE, STATS_FILE = "cache.safetensors", "kb.json", "knowledge.json", "stats.json"
TENANT_FILE, VERSION_FILE = "tenant.json", "version.json"


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
        return Entry(name, loaded.layers, loaded.prefix_ids, loaded.manifest, record.meta, snapshot, owner=record.owner,
                     state=loaded.state)

    def put(self, entry: Entry) -> dict:
        self.put_record(entry.record, entry.snapshot)
        return save_file(self.folder(entry.name) / CACHE_FILE, entry)

    def drop(self, name: str) -> bool:
        path = self.folder(name) / CACHE_FILE
        existed = path.is_file()
        path.unlink(missing_ok=True)
        return existed

    def has(self, name: str) -> bool:
        return (self.folder(name) / CACHE_FILE).is_file()

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
            meta = loads((folder / KB_FILE).read_bytes())
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
            return checked_snapshot(loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            damaged(name, f"knowledge text {path}", str(err))
            return None

    def put_record(self, record: Record, snapshot: list[dict]) -> None:
        folder = self.folder(record.name)
        atomic.write_text(folder / SNAPSHOT_FILE, json.dumps(snapshot, ensure_ascii=False))
        if record.owner is not None:  # before kb.json: no moment where it looks like a CLI-built one
            atomic.write_text(folder / TENANT_FILE, json.dumps({"tenant": record.owner}))
        else:
            (folder / TENANT_FILE).unlink(missing_ok=True)
        atomic.write_text(folder / KB_FILE, json.dumps(record.meta, indent=2))

    def names(self) -> list[str]:
        root = self.root or paths.kbs_dir()
        if not root.is_dir():
            return []
        return sorted(f.name for f in root.iterdir() if valid_name(f.name) and (f / KB_FILE).is_file())

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
        found = loads((folder / TENANT_FILE).read_bytes())
    except FileNotFoundError:
        return None
    if not isinstance(found, dict) or "tenant" not in found:
        raise ValueError(f"{TENANT_FILE} names no tenant")
    return found["tenant"]
