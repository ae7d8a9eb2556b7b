"""The registry of knowledge bases: every name on disk or in Redis, where its cache lives, how big, how used.

A knowledge base is registered by its record (settings in kb.json: model, template instruction,
policies; and its owner); its cache may live in several tiers at once, or in none (dropped: the next
load rebuilds it). A deleted one leaves a tombstone in the shared tier, so no replica lists it again.
One whose record is damaged is left out of the listing (the store logs why: a listing is everyone's,
and no single knowledge base may break it) and can still be removed.

Names. A knowledge base has the name its user gave it and, when it was created through the server, a
tenant: `cag ls`, `cag ask NAME --tenant T` and the server all speak of (NAME, tenant). The stores keep
one flat key per knowledge base, `NAME` for one built with the CLI (no tenant) and `TENANT__NAME` for a
tenant's, so that two tenants' knowledge bases of the same name never share a key, folder or Redis
record; `key` and `split` turn one form into the other, and only they know the separator. A
`TENANT__NAME` key without an owner record (one copied by an older version) still counts as TENANT's.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from . import engines, paths
from .cache import kvfile
from .cache.policies import Policy
from .cache.stores import TieredStore
from .cache.stores.base import valid_name
from .errors import CacheFileError, CagError, ModelMissingError, NotFoundError

SEPARATOR = "__"
OPEN_TENANT = "public"  # the tenant of every request to a server without API keys


# -- names --------------------------------------------------------------------------------------------

def key(name: str, tenant: str | None) -> str:
    """The store key of knowledge base `name` of `tenant` (None: one built with the CLI)."""
    return name if tenant is None else f"{tenant}{SEPARATOR}{name}"


def owner_of(stored: str, recorded: str | None) -> str | None:
    """The tenant a knowledge base belongs to; None for one built by the CLI. A `TENANT__NAME` one without
    an owner record is TENANT's: keys of that form are the server's, and must never become shared."""
    if recorded is None and SEPARATOR in stored:
        return stored.split(SEPARATOR, 1)[0]
    return recorded


def split(stored: str, recorded: str | None) -> tuple[str, str | None]:
    """(name, tenant) of the knowledge base stored under the key `stored` whose record names `recorded` as
    its owner."""
    tenant = owner_of(stored, recorded)
    own = f"{tenant}{SEPARATOR}"
    return (stored[len(own):] if tenant is not None and stored.startswith(own) else stored), tenant


def resolve(name: str, tenant: str | None = None, store: TieredStore | None = None,
            log: Callable[[str], None] | None = None) -> str:
    """The store key of the knowledge base a user of the CLI means by `name` (and `tenant`).

    With a tenant: that tenant's `name`, nothing else. Without one: the knowledge base built with the CLI
    under that name (or stored under that very key: the `TENANT__NAME` spelling of earlier versions), else
    the one the open server's tenant created under it, as an open server would answer it. A name nobody
    has is a NotFoundError that names the tenants who do have one."""
    from .cache import stores

    store = store or stores.default()
    if tenant is not None:
        wanted = key(name, tenant)
        if _owned(store, wanted, tenant):
            return wanted
        raise NotFoundError(f"tenant {tenant!r} has no knowledge base named {name!r}" + _elsewhere(store, name))
    if store.record(name) is not None:
        if log is not None and _owned(store, key(name, OPEN_TENANT), OPEN_TENANT):
            log(f"(tenant {OPEN_TENANT!r} also has a knowledge base named {name!r}: --tenant {OPEN_TENANT} selects it)")
        return name
    if _owned(store, key(name, OPEN_TENANT), OPEN_TENANT):
        return key(name, OPEN_TENANT)
    raise NotFoundError(f"no knowledge base named {name!r} in {paths.kbs_dir()}" + (
        _elsewhere(store, name) or "; build it with `cag build`"))


def _owned(store: TieredStore, wanted: str, tenant: str) -> bool:
    if not valid_name(wanted):  # a name too long to carry this tenant's prefix: no knowledge base of theirs
        return False
    record = store.record(wanted)
    return record is not None and owner_of(wanted, record.owner) == tenant


def _elsewhere(store: TieredStore, name: str) -> str:
    """'; tenant T has one: add --tenant T' for the tenants holding `name` (the CLI sees every tenant's)."""
    tenants = set()
    for stored in store.names():
        record = store.record(stored) if stored.endswith(f"{SEPARATOR}{name}") else None
        if record is not None:
            shown, tenant = split(stored, record.owner)
            if shown == name and tenant is not None:
                tenants.add(tenant)
    if not tenants:
        return ""
    ordered = sorted(tenants)
    has = f"tenant {ordered[0]} has one" if len(ordered) == 1 else f"tenants {', '.join(ordered)} have one"
    return f"; {has}: add --tenant {ordered[0]}"


# -- rows of `cag ls` ---------------------------------------------------------------------------------

def rows(store: TieredStore, verify: bool = False) -> list[dict]:
    """name, tenant, key, owner, model, tokens, documents, bytes, created, status, tiers, hits, age_s, policy, parent.

    `status` says whether a cache is there ("cached") and, with `verify`, whether its file passes the
    checks every load makes (checksum, signature; and that the model is still the one it was made with): "ok",
    "broken: why", "model changed: …" or "model missing: …". Without `verify` nothing is
    read but the manifests, which a damaged cache can still have intact: the status then says so.
    A sharded knowledge base's row adds up its shards (tokens, bytes, hits; the latest creation time); each
    shard has a row of its own too, naming its `parent`."""
    out = [_row(name, store, verify) for name in store.names()]
    out = [row for row in out if row is not None]
    by_key = {row["key"]: row for row in out}
    for row in out:
        shards = [by_key[s] for s in row.pop("shards", None) or () if s in by_key]
        if shards:
            unfit = sum(not r["tiers"] or r["verified"] is False for r in shards)
            row.update(tokens=sum(r["tokens"] or 0 for r in shards), bytes=sum(r["bytes"] or 0 for r in shards),
                       created=max((r["created"] for r in shards if r["created"]), default=None),
                       tiers=sorted({t for r in shards for t in r["tiers"]}), hits=sum(r["hits"] for r in shards),
                       verified=all(r["verified"] is True for r in shards) if verify else None,
                       status=f"sharded: {len(shards)} shards" + (f" ({unfit} not cached or broken)" if unfit else ""))
    return out


def _row(stored: str, store: TieredStore, verify: bool) -> dict | None:
    record = store.record(stored)
    if record is None:
        return None  # deleted elsewhere since its local copy was made, or its record is damaged
    meta, snapshot = record.meta, store.snapshot(stored)
    name, tenant = split(stored, record.owner)
    row = {"name": name, "tenant": tenant, "key": stored, "owner": record.owner, "model": meta.get("model"),
           "engine": meta.get("engine") or "torch", "policy": Policy.from_meta(meta).to_json(),
           "parent": meta.get("parent"), "shards": meta.get("shards")}
    try:
        tiers = store.info(stored)
    except CacheFileError as err:  # a manifest that cannot be read
        tiers = {}
        status, verified = f"broken: {err}", False
    else:
        try:
            status, verified = _status(stored, store, tiers, verify, meta)
        except CacheFileError as err:  # what only reading the whole file shows: a checksum or signature
            status, verified = f"broken: {err}", False
    where = tiers.get("disk") or next(iter(tiers.values()), {})
    built = meta.get("built_at")
    row.update(tokens=where.get("tokens"), documents=len(snapshot) if snapshot is not None else None,
               bytes=where.get("bytes"), created=where.get("created"), status=status, verified=verified,
               tiers=list(tiers), hits=sum(i.get("hits", 0) for i in tiers.values()),
               age_s=round(time.time() - built, 1) if built else _age(where.get("created")))
    return row


def _status(stored: str, store: TieredStore, tiers: dict, verify: bool, meta: dict) -> tuple[str, bool | None]:
    """(status, verified) of a cache held by `tiers`. Verifying reads the local file whole, as a load does
    (a cache held only in Redis is checked by the process that fetches it), and checks its model as a load
    would refuse it (_model_problem)."""
    if not tiers:
        return "not cached (the next load rebuilds it)", None
    if not verify:
        return "cached (not verified)", None
    if "disk" not in tiers:
        return f"cached (only in {', '.join(tiers)}: not verified)", None
    loaded = kvfile.load(store.local_file(stored))  # checksum, signature: a CacheFileError says what is wrong
    problem = _model_problem(meta.get("model"), loaded.manifest.get("model") or {})
    return (problem, False) if problem else ("ok", True)


def _model_problem(spec: str | None, made: dict) -> str | None:
    """Why the model `spec` names is no longer the one a cache was made with (`made`: its manifest's model
    section), as its fingerprint tells without loading it; None when it is the same. A load refuses such a
    cache, so a listing must not call it ok."""
    try:
        where, now = engines.fingerprint_now(spec, made.get("path"))
    except ModelMissingError as err:
        return f"model missing: {err}; put it back, or rebuild with `cag build --model`"
    except (CagError, OSError) as err:
        return f"model unusable: {err}"
    if now != made.get("fingerprint"):
        return (f"model changed: {where} is not the model the cache was made with; put it back, or rebuild "
                "with `cag build`")
    return None


def model_label(model: str | None) -> str | None:
    """A model as people read it in a listing: a hub id, alias or ollama:NAME as given; a local folder or
    file (a GGUF path) by its last part only."""
    if not model:
        return model
    path = Path(model).expanduser()
    return path.name if path.is_absolute() or path.exists() or path.suffix.lower() == ".gguf" else model


def delete(name: str, store: TieredStore) -> None:
    """Remove the knowledge base everywhere: caches in every tier, its settings, owner and saved text,
    on every replica (a tombstone in the shared tier; refused, changing nothing, while it is down)."""
    record = store.record(name)
    if record is None:
        if name not in store.names():
            raise NotFoundError(f"no knowledge base named {name!r} in {paths.kbs_dir()}")
        store.delete(name)  # its record is damaged (the store said why): whatever is left of it goes
        return
    parent = record.meta.get("parent")
    if parent:
        raise CagError(f"{name!r} is one shard of the knowledge base {parent!r}; a shard alone cannot be removed "
                       f"(its questions would have nowhere to go): remove the whole one with `cag rm {parent}`")
    for shard in record.meta.get("shards") or ():
        if store.record(shard) is not None:
            store.delete(shard)
    store.delete(name)


def _age(created: str | None) -> float | None:
    try:
        when = datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        return None  # none recorded, or not in the manifest's format
    return round(time.time() - when.timestamp(), 1)
