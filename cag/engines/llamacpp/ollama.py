"""Ollama models are GGUF files in Ollama's local store; this finds the one a name:tag stands for.

Layout (Ollama's own): $OLLAMA_MODELS, else ~/.ollama/models, holds
  manifests/registry.ollama.ai/library/NAME/TAG   (NAMESPACE/NAME for models not in the library)
  blobs/sha256-<hex>
and a manifest's layer of media type application/vnd.ollama.image.model names the model's blob.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ...errors import ModelError, ModelMissingError

MODEL_LAYER = "application/vnd.ollama.image.model"
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def store() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def resolve(name: str) -> Path:
    """The blob of `name` ("smollm2", "smollm2:135m", "user/model:tag", "host/ns/model:tag")."""
    base, _, tag = name.partition(":")
    tag = tag or "latest"
    parts = base.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", *parts]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    if len(parts) != 3 or not all(_PART.match(p) for p in [*parts, tag]):
        raise ModelError(f"not an Ollama model name: {name!r} (use NAME, NAME:TAG or NAMESPACE/NAME:TAG)")
    root = store()
    manifest = root / "manifests" / Path(*parts) / tag
    if not manifest.is_file():
        raise ModelMissingError(f"Ollama model {name!r} is not in {root} (no {manifest}); run `ollama pull {name}` "
                                "or set OLLAMA_MODELS to the store that has it")
    try:
        layers = json.loads(manifest.read_text())["layers"]
        digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == MODEL_LAYER)
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        raise ModelError(f"Ollama manifest {manifest} names no model layer; pull the model again") from None
    algo, _, hexdigest = str(digest).partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
        raise ModelError(f"Ollama manifest {manifest} has a malformed model digest {digest!r}")
    blob = root / "blobs" / f"sha256-{hexdigest}"
    if not blob.is_file():
        raise ModelMissingError(f"the model blob of Ollama model {name!r} is missing ({blob}); pull the model again")
    return blob


def check_blob(name: str, blob: Path, sha256: str) -> None:
    """Refuse a blob whose content is not what its name says: Ollama names every blob by its sha256, so a
    mismatch is a damaged or altered file, and a model that silently differs from the one pulled."""
    if blob.name != f"sha256-{sha256}":
        raise ModelError(f"the Ollama blob of model {name} ({blob}) does not match its sha256 name: it is damaged "
                         f"or was altered; run `ollama pull {name}`")


def listing() -> list[dict]:
    """Every model in the local Ollama store, as `ollama list` shows them: its name (NAME:TAG for the library,
    NAMESPACE/NAME:TAG or HOST/NAMESPACE/NAME:TAG otherwise), its blob and size; a manifest whose blob is
    missing or unreadable is listed with `problem` set rather than left out."""
    root = store() / "manifests"
    found = []
    for manifest in sorted(p for p in root.glob("*/*/*/*") if p.is_file()) if root.is_dir() else []:
        host, namespace, model, tag = manifest.relative_to(root).parts
        base = model if (host, namespace) == ("registry.ollama.ai", "library") else (
            f"{namespace}/{model}" if host == "registry.ollama.ai" else f"{host}/{namespace}/{model}")
        row = {"name": f"{base}:{tag}", "model": f"ollama:{base}:{tag}", "blob": None, "bytes": None, "problem": None}
        try:
            blob = resolve(f"{base}:{tag}")
            row.update(blob=str(blob), bytes=blob.stat().st_size)
        except (ModelError, OSError) as err:
            row["problem"] = str(err)
        found.append(row)
    return found
