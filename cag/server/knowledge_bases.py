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
from pathlib import Path
from typing import BinaryIO

from .. import api, engines, paths, settings
from ..cache import events, stores
from ..cache.stores.redis import RedisError
from ..engines.base import Engine
from ..engines.options import EngineOptions
from ..errors import CagError, ModelChangedError
from ..kb import knowledge
from ..registry import key as stored_key
from ..registry import model_label, owner_of
from .config import ServerConfig, same_model
from .http_errors import ApiError, not_found
from .model_pool import LoadedKB, ModelPool, ModelUnavailable

log = logging.getLogger("cag.server")
DOCS_DIR = "docs"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,45}$")
_DOC = re.compile(r"[^A-Za-z0-9._ -]")


class KnowledgeBases:
    def __init__(self, config: ServerConfig, lm: Engine | None = None):
        self.config = config
        self._lock = threading.Lock()
        self._folder_locks: dict[str, threading.Lock] = {}
        budget = config.model_bytes if config.model_bytes is not None else settings.current().model_bytes
        self.models = ModelPool(config, budget, lm)  # models and loaded knowledge bases, under the budget

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

    def row(self, tenant: str, name: str) -> dict:
        """The caller's knowledge base `name` as `list` shows it; 404 when the caller has none of that name."""
        found = next((r for r in self.list(tenant) if r["name"] == name), None)
        if found is None:
            raise not_found(name)
        return found

    # -- loading -----------------------------------------------------------------------------------
    def lease(self, tenant: str, name: str) -> LoadedKB:
        """The loaded KB, held for an answer until `release`: loaded on first use (room made for it under
        the memory budget) and reloaded when its cache file was rebuilt meanwhile."""
        folder = self.folder_for(tenant, name)
        entry = self.models.lease(folder, _stamp(folder))
        if entry is not None:
            return entry
        record = _record(folder)
        if record is None:
            raise not_found(name)
        meta = record.meta
        try:
            return self.models.load(folder, lambda: _stamp(folder), EngineOptions().over(meta),
                                    tokens=lambda lm: _prefix_tokens(folder, meta, lm),
                                    open_kb=lambda lm: api.load(folder, lm=lm, log=log.info))
        except (ModelUnavailable, ModelChangedError) as err:  # a file gone, or another model in its place
            model = model_label(meta.get("model") or engines.DEFAULT_MODEL)
            raise ApiError(503, f"knowledge base {name!r} is answered by the model {model}, which cannot be loaded "
                                f"on this server: {err}", "server_error", "model_unavailable") from None

    def release(self, entry: LoadedKB) -> None:
        self.models.release(entry)

    def get(self, tenant: str, name: str) -> LoadedKB:
        """The loaded KB, for what it says about itself (no answer runs on it: it is not held)."""
        entry = self.lease(tenant, name)
        self.release(entry)
        return entry

    def peek(self, folder: str) -> LoadedKB | None:
        return self.models.peek(folder)

    # -- management (server-created KBs only) ------------------------------------------------------
    def create(self, tenant: str, name: str, docs: list[tuple[str, bytes | BinaryIO]], model: str | None = None) -> LoadedKB:
        """A new knowledge base of `docs`, built with `model` (one of the config's kb_models; None: the server's
        own)."""
        model = self.allowed_model(model)
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
                return self._build(tenant, folder, target, model)
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise

    def replace(self, tenant: str, name: str, docs: list[tuple[str, bytes | BinaryIO]]) -> LoadedKB:
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
                entry = self._build(tenant, folder, target, _record_model(folder))
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
            self.models.forget(folder)
        return folder

    def _owned(self, tenant: str, name: str) -> str:
        folder = self.folder_for(tenant, name)
        if folder != stored_key(name, tenant):
            raise ApiError(403, f"knowledge base {name!r} was built with the CLI; change it with `cag build` "
                                "or `cag rm`", "permission_error", "read_only_kb")
        return folder

    def allowed_model(self, model: str | None) -> str | None:
        """`model` as the config allows it (None: the server's own); 400 naming the allowed ones otherwise, never
        quietly another model."""
        if model is None:
            return None
        allowed = self.config.kb_models()
        found = next((m for m in allowed if same_model(model, m)), None)
        if found is None:
            raise ApiError(400, f"this server does not build knowledge bases with the model {model!r}; it builds them "
                                f"with {', '.join(map(repr, allowed))} (the server config's model and allowed_models)",
                           param="model", code="model_not_allowed")
        return None if found == allowed[0] else found

    def _build(self, tenant: str, folder: str, target: Path, model: str | None = None) -> LoadedKB:
        """Build on `model` (None: the server's own), with room made for it and the new prefix (not held
        afterwards)."""
        def build(lm: Engine):
            try:
                return api.build([target / DOCS_DIR], name=folder, lm=lm, log=log.info, owner=tenant)
            except CagError as err:
                raise ApiError(400, str(err), code="build_failed") from None

        if model is not None and same_model(model, self.config.kb_models()[0]):
            model = None  # the server's own model, loaded with its own options
        options = self.models.default_model() if model is None else self.config.engine_options(model)
        try:
            entry = self.models.load(folder, lambda: _stamp(folder), options, reuse=False,
                                     tokens=lambda lm: lm.context_window, open_kb=build)
        except ModelUnavailable as err:
            raise ApiError(503, f"the server's model {model_label(options.model or engines.DEFAULT_MODEL)} cannot be loaded: "
                                f"{err}", "server_error", "model_unavailable") from None
        self.release(entry)
        return entry


def _record_model(folder: str) -> str | None:
    """The model a knowledge base of this server was built with (a rebuild keeps it); None: the server's own."""
    found = _record(folder)
    return (found.meta if found is not None else {}).get("model")


def _record(folder: str):
    """Settings and owner of `folder`, wherever they are (this CAG_HOME or the shared Redis tier), or None."""
    try:
        return api.record(folder)
    except CagError:
        return None


def _prefix_tokens(folder: str, meta: dict, lm: Engine) -> int:
    """About how many positions the prefix of `folder` holds, before loading it: its cache file's manifest
    (each shard's, for a sharded one), else the model's whole window."""
    tokens = 0
    for part in meta.get("shards") or [folder]:
        try:
            tokens += int(stores.default().local_manifest(part)["tokens"])
        except (CagError, OSError, KeyError, TypeError, ValueError):
            tokens += lm.context_window
    return tokens


def _stamp(folder: str) -> tuple[int, int]:
    path = stores.default().local_file(folder)
    try:
        mtime = path.stat().st_mtime_ns if path is not None else -1
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
