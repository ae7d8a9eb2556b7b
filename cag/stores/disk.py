"""Disk tier: the kvfile format under CAG_HOME/kbs/NAME/ (cache.safetensors, kb.json, knowledge.json).

It is what makes a restart cheap: a new process finds the cache here and answers without prefill.
Dropping a cache keeps kb.json and knowledge.json, so the knowledge base can still be rebuilt.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .. import atomic, kvfile, paths
from ..kvfile import Expect
from .base import Entry, save_file

CACHE_FILE, KB_FILE, SNAPSHOT_FILE, STATS_FILE = "cache.safetensors", "kb.json", "knowledge.json", "stats.json"


class DiskStore:
    name = "disk"
    persistent = True

    def folder(self, name: str) -> Path:
        return paths.kb_dir(name)

    def get(self, name: str, expect: Expect, device: torch.device | str) -> Entry | None:
        folder = self.folder(name)
        if not (folder / CACHE_FILE).is_file() or not (folder / KB_FILE).is_file():
            return None
        loaded = kvfile.load(folder / CACHE_FILE, expect, device=device)
        meta = json.loads((folder / KB_FILE).read_text())
        self._count_hit(folder)
        return Entry(name, loaded.layers, loaded.prefix_ids, loaded.manifest, meta, self.snapshot(name) or [])

    def put(self, entry: Entry) -> dict:
        folder = self.folder(entry.name)
        self.put_meta(entry.name, entry.meta, entry.snapshot)
        return save_file(folder / CACHE_FILE, entry)

    def put_meta(self, name: str, meta: dict, snapshot: list[dict]) -> None:
        folder = self.folder(name)
        atomic.write_text(folder / SNAPSHOT_FILE, json.dumps(snapshot, ensure_ascii=False))
        atomic.write_text(folder / KB_FILE, json.dumps(meta, indent=2))

    def meta(self, name: str) -> dict | None:
        path = self.folder(name) / KB_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def snapshot(self, name: str) -> list[dict] | None:
        try:
            return json.loads((self.folder(name) / SNAPSHOT_FILE).read_text())
        except (OSError, ValueError):
            return None

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
