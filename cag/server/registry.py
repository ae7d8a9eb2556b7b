"""Knowledge bases as the server sees them: one shared model, KBs loaded lazily and kept, tenant ownership.

A KB created through the server is the tenant's NAME (stored under the key cag.registry.key gives it,
`TENANT__NAME`, which no other tenant's can take) and its owner is part of its record, which travels
with it through every tier and replica (on disk, the `tenant.json` sidecar; in Redis, beside its
settings): only that tenant sees it, as NAME, here and in `cag ls` (NAME with its tenant). KBs without
an owner were built by the CLI: every tenant sees them when the server is open (no keys) or when
`share_cli_kbs` is on, nobody otherwise. A `TENANT__NAME` KB without an owner record (one copied by an
older version) counts as TENANT's.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .. import api, paths, settings
from ..cache import events
from ..cache.stores.redis import RedisError
from ..engines.base import Engine
from ..errors import CagError
from ..kb import knowledge
from ..registry import key as stored_key
from ..registry import owner_of
from .config import ServerConfig
from .errors import ApiError, not_found
from .models import Models

log = logging.getLogger("cag.server")
DOCS_DIR = "docs"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,45}$")
_DOC = re.compile(r"[^A-Za-z0-9._ -]")


@dataclass
class Entry:
    kb: api.KnowledgeBase
    stamp: tuple[int, int]  # (cache file mtime_ns, events generation) when loaded: a rebuild, invalidation or
    # delete by the CLI or another replica changes it

    @property
    def content_hash(self) -> str:
        return self.kb.manifest.get("knowledge", {}).get("sha256", "") + self.kb.manifest.get("created", "")


class Registry:
    def __init__(self, config: ServerConfig, lm: Engine | None = None):
        self.config = config
        self._lock = threading.Lock()
        self._folder_locks: dict[str, threading.Lock] = {}
        self._loaded: dict[str, Entry] = {}
        budget = config.model_bytes if config.model_bytes is not None else settings.current().model_bytes
        self.models = Models(config, budget, lm, on_drop=self._unload)

    def _unload(self, engine: Engine) -> None:
        """An engine left the model cache: forget the knowledge bases loaded on it (answers running on them
        keep what they hold until they end)."""
        for folder in [f for f, e in self._loaded.items() if e.kb.lm is engine]:
            self._loaded.pop(folder, None)

    def _folder_lock(self, folder: str) -> threading.Lock:
        with self._lock:
            return self._folder_locks.setdefault(folder, threading.Lock())

    # -- visibility --------------------------------------------------------------------------------
    def _cli_visible(self) -> bool:
        return self.config.open or self.config.share_cli_kbs

    def folder_for(self, tenant: str, name: str) -> str:
        """The folder behind `name` for this tenant, or a 404 that is the same for 'absent' and 'not yours'."""
        if _NAME.match(name or ""):
            owned = stored_key(name, tenant)
            record = _record(owned)
            if record is not None and owner_of(owned, record.owner) == tenant:
                return owned
            record = _record(name) if self._cli_visible() else None
            if record is not None and owner_of(name, record.owner) is None:
                return name
        raise not_found(name)

    def list(self, tenant: str) -> list[dict]:
        rows = []
        for row in api.list_kbs():
            if row.get("parent"):
                continue  # one shard of a larger knowledge base: asked through its parent
            shown = {k: v for k, v in row.items() if k != "key"}  # the store's key is no client's business
            if row["tenant"] == tenant and row["key"] == stored_key(row["name"], tenant):
                rows.append({**shown, "owned_by": tenant})
            elif row["tenant"] is None and self._cli_visible():
                rows.append({**shown, "owned_by": "cli"})
        return rows

    # -- loading -----------------------------------------------------------------------------------
    def get(self, tenant: str, name: str) -> Entry:
        """The loaded KB; loaded on first use and reloaded when its cache file was rebuilt meanwhile."""
        folder = self.folder_for(tenant, name)
        stamp = _stamp(folder)
        entry = self._loaded.get(folder)
        if entry is not None and entry.stamp == stamp:
            return entry
        with self._folder_lock(folder):
            entry = self._loaded.get(folder)
            if entry is None or entry.stamp != _stamp(folder):
                record = _record(folder)
                if record is None:
                    raise not_found(name)
                lm = self.models.for_kb(name, record.meta)
                entry = Entry(api.load(folder, lm=lm, log=log.info), _stamp(folder))
                self._loaded[folder] = entry
            return entry

    def peek(self, folder: str) -> Entry | None:
        return self._loaded.get(folder)

    # -- management (server-created KBs only) ------------------------------------------------------
    def create(self, tenant: str, name: str, docs: list[tuple[str, bytes | BinaryIO]]) -> Entry:
        if not _NAME.match(name or ""):
            raise ApiError(400, f"invalid knowledge base name {name!r}: use 1-46 letters, digits, '.', '_' or '-', "
                                "starting with a letter or digit", code="invalid_name")
        folder = stored_key(name, tenant)
        with self._folder_lock(folder):
            try:
                self.folder_for(tenant, name)
                raise ApiError(409, f"knowledge base {name!r} already exists; PUT /v1/kbs/{name} replaces its "
                                    "documents", code="kb_exists")
            except ApiError as err:
                if err.status != 404:
                    raise
            target = paths.kb_dir(folder)
            if target.exists():
                if _record(folder) is not None:  # a knowledge base of that folder name exists: not ours to overwrite
                    raise ApiError(409, f"knowledge base {name!r} already exists", code="kb_exists")
                shutil.rmtree(target)  # left by a create that never finished (the server stopped mid-build)
            try:
                _write_docs(target / DOCS_DIR, docs)
                return self._build(tenant, folder, target)
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise

    def replace(self, tenant: str, name: str, docs: list[tuple[str, bytes | BinaryIO]]) -> Entry:
        folder = self._owned(tenant, name)
        target = paths.kb_dir(folder)
        with self._folder_lock(folder):
            staged, old = target / (DOCS_DIR + ".new"), target / (DOCS_DIR + ".old")
            shutil.rmtree(staged, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
            _write_docs(staged, docs)
            had_docs = (target / DOCS_DIR).is_dir()  # not on a replica that only holds a copy of the cache
            if had_docs:
                (target / DOCS_DIR).rename(old)
            staged.rename(target / DOCS_DIR)
            try:
                entry = self._build(tenant, folder, target)
            except BaseException:
                shutil.rmtree(target / DOCS_DIR, ignore_errors=True)
                if had_docs:
                    old.rename(target / DOCS_DIR)
                raise
            shutil.rmtree(old, ignore_errors=True)
            return entry

    def delete(self, tenant: str, name: str) -> str:
        folder = self._owned(tenant, name)
        with self._folder_lock(folder):
            try:
                api.delete(folder)
            except RedisError as err:
                log.warning("delete of %s refused: %s", folder, err)
                raise ApiError(503, f"knowledge base {name!r} was not deleted: the shared cache store is unreachable "
                                    "and a delete must reach every replica; nothing changed, try again shortly",
                               "server_error", "store_unavailable") from None
            self._loaded.pop(folder, None)
        return folder

    def _owned(self, tenant: str, name: str) -> str:
        folder = self.folder_for(tenant, name)
        if folder != stored_key(name, tenant):
            raise ApiError(403, f"knowledge base {name!r} was built with the CLI; change it with `cag build` "
                                "or `cag rm`", "permission_error", "read_only_kb")
        return folder

    def _build(self, tenant: str, folder: str, target: Path) -> Entry:
        try:
            kb = api.build([target / DOCS_DIR], name=folder, lm=self.models.default(), log=log.info, owner=tenant)
        except CagError as err:
            raise ApiError(400, str(err), code="build_failed") from None
        entry = Entry(kb, _stamp(folder))
        self._loaded[folder] = entry
        return entry


def _record(folder: str):
    """Settings and owner of `folder`, wherever they are (this CAG_HOME or the shared Redis tier), or None."""
    try:
        return api.record(folder)
    except CagError:
        return None


def _stamp(folder: str) -> tuple[int, int]:
    try:
        mtime = (paths.kb_dir(folder) / api.CACHE_FILE).stat().st_mtime_ns
    except OSError:
        mtime = -1
    return mtime, events.generation(folder)


def safe_doc_name(name: str, default_suffix: str | None = ".txt") -> str:
    """A flat, harmless file name; a missing suffix becomes .txt for text bodies and an error for uploads."""
    base = _DOC.sub("_", Path(name or "").name).lstrip(".") or "document"
    if Path(base).suffix.lower() not in knowledge.SUPPORTED:
        if default_suffix is None:
            raise ApiError(400, f"unsupported file type for {name!r}: use one of {', '.join(sorted(knowledge.SUPPORTED))}",
                           code="unsupported_file")
        base += default_suffix
    return base


def _write_docs(folder: Path, docs: list[tuple[str, bytes | BinaryIO]]) -> None:
    """Write each document; an upload (a file object) is copied in pieces, never held whole in memory."""
    if not docs:
        raise ApiError(400, "give at least one document", code="no_documents")
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in docs:
        path = folder / name
        if path.exists():
            raise ApiError(400, f"two documents are named {name!r}; names must be unique", code="duplicate_document")
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            with path.open("wb") as out:
                shutil.copyfileobj(data, out)
