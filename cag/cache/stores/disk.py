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
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .. import atomic, kvfile
from ... import paths
from ...errors import CagError
from ..kvfile import Expect
from .base import Entry, Record, Store, Tombstone, save_file

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
        record = self.record(name)
        if not (folder / CACHE_FILE).is_file() or record is None:
            return None
        loaded = kvfile.load(folder / CACHE_FILE, expect, device=device)
        self._count_hit(folder)
        return Entry(name, loaded.layers, loaded.prefix_ids, loaded.manifest, record.meta, self.snapshot(name) or [],
                     owner=record.owner)

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

    def info(self, name: str) -> dict | None:
        path = self.folder(name) / CACHE_FILE
        if not path.is_file():
            return None
        manifest = kvfile.read_manifest(path)
        return {"bytes": path.stat().st_size, "tokens": manifest.get("tokens"), "created": manifest.get("created"),
                "hits": self._stats(path.parent).get("hits", 0)}

    # -- the record --------------------------------------------------------------------------------
    def record(self, name: str) -> Record | None:
        folder = self.folder(name)
        try:
            meta = json.loads((folder / KB_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise CagError(f"the settings of knowledge base {name!r} ({folder / KB_FILE}) are unreadable: {err}; "
                           f"rebuild it with `cag build` or remove it with `cag rm {name}`") from None
        return Record(name, meta, _owner(folder))

    def snapshot(self, name: str) -> list[dict] | None:
        try:
            return json.loads((self.folder(name) / SNAPSHOT_FILE).read_text())
        except (OSError, ValueError):
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
        return sorted(f.name for f in root.iterdir() if (f / KB_FILE).is_file()) if root.is_dir() else []

    # -- version and deletion ----------------------------------------------------------------------
    def version(self, name: str) -> int | None:
        try:
            return int(json.loads((self.folder(name) / VERSION_FILE).read_text())["version"])
        except (OSError, ValueError, KeyError, TypeError):
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
    def _stats(self, folder: Path) -> dict:
        try:
            return json.loads((folder / STATS_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def _count_hit(self, folder: Path) -> None:
        stats = self._stats(folder)
        stats.update(hits=stats.get("hits", 0) + 1, last_hit=time.time())
        try:
            atomic.write_text(folder / STATS_FILE, json.dumps(stats))
        except OSError:
            pass  # a read-only home still answers; only the counter is lost


def _owner(folder: Path) -> str | None:
    try:
        owner = json.loads((folder / TENANT_FILE).read_text())["tenant"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        # a damaged sidecar must not turn a tenant's knowledge base into one every tenant may see
        return _UNREADABLE
    return str(owner)


_UNREADABLE = "\0unreadable"  # an owner no tenant can be
