"""A local Ollama store written the way Ollama writes one: blobs named by their sha256, a manifest per tag."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path


def ollama_store(root: Path, blob_of: Path) -> Path:
    """An Ollama store whose model tiny:q4 is `blob_of`'s bytes, in a blob named by their sha256 as Ollama
    names it (a second call points the tag at the new blob: a pull of a newer model)."""
    digest = hashlib.sha256(blob_of.read_bytes()).hexdigest()
    blob = root / "blobs" / f"sha256-{digest}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(blob_of, blob)
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "q4"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}"}]}))
    return blob
