"""The models a user has: the default model, the GGUFs in the local Ollama store, and the models knowledge
bases were built with (`cag models`). Reads only names, manifests and file sizes: nothing is loaded."""

from __future__ import annotations

from pathlib import Path

from . import api, engines
from .engines.llamacpp.ollama import listing, store
from .registry import model_label


def models() -> list[dict]:
    """One row per model: `model` (what --model takes), `engine`, `bytes` (the file's, when it is one),
    `source` (default, ollama, file or folder), the knowledge bases that use it, and `problem` when it is
    not where it should be."""
    rows: dict[str, dict] = {}
    default = engines.DEFAULT_MODEL
    rows[default] = _row(default, "torch", None, "default")
    for found in listing():
        rows[found["model"]] = _row(found["model"], "llamacpp", found["bytes"], "ollama", found["problem"])
    for kb in api.list_kbs():
        if kb.get("parent"):
            continue  # a shard: its parent is listed
        name = kb.get("model") or default
        row = rows.get(name) or rows.setdefault(name, _local(name, kb.get("engine")))
        row["knowledge_bases"].append(kb["name"] if not kb.get("tenant") else f"{kb['tenant']}/{kb['name']}")
    return list(rows.values())


def ollama_store() -> Path:
    return store()


def _row(model: str, engine: str | None, size: int | None, source: str, problem: str | None = None) -> dict:
    return {"model": model, "label": model_label(model), "engine": engine or engines.kind_of(model), "bytes": size,
            "source": source, "knowledge_bases": [], "problem": problem}


def _local(model: str, engine: str | None) -> dict:
    """A model named by a knowledge base: a file or folder on this machine (or a hub id), and whether it is there."""
    if model.startswith("ollama:"):
        return _row(model, "llamacpp", None, "ollama", "not in the local Ollama store")
    path = Path(model).expanduser()
    if path.is_file():
        return _row(model, engine, path.stat().st_size, "file")
    if path.is_dir():
        return _row(model, engine, sum(p.stat().st_size for p in path.rglob("*") if p.is_file()), "folder")
    local = model.startswith((".", "/", "~"))
    return _row(model, engine, None, "file" if local else "hub", "not found on this machine" if local else None)
