"""Cache files as a test makes and alters them: the identity a test cache is made for, a prefix of the tiny
model and that prefix saved (fixtures), and a rewrite the way an attacker or a buggy tool would make one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import torch_direct as eu

from cag.cache import kvfile


IDENTITY = {
    "model": {"name": "tiny", "fingerprint": "m" * 64},
    "tokenizer": {"fingerprint": "t" * 64},
    "template": {"fingerprint": "p" * 64},
    "knowledge": {"sha256": "k" * 64, "documents": 1},
}


def resave(path: Path, edit_manifest=None, edit_tensors=None, recompute=False):
    """Rewrite a cache file the way an attacker or a buggy tool would: valid safetensors, altered content
    (with `recompute`, a checksum made afresh over the altered content, as a forger would)."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        manifest = json.loads(f.metadata()[kvfile.MANIFEST_KEY])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_manifest:
        edit_manifest(manifest)
    if recompute:
        manifest["tensors_sha256"] = kvfile._checksum(tensors, manifest.get("checksum"), manifest)
    save_file(tensors, str(path), metadata={kvfile.MANIFEST_KEY: json.dumps(manifest)})


@pytest.fixture
def cache(tiny_lm):
    ids = list(range(5, 105))
    return eu.prefill(tiny_lm, ids), ids


@pytest.fixture
def saved(tmp_path, cache, monkeypatch):
    monkeypatch.delenv("CAG_SIGNING_KEY", raising=False)
    path = tmp_path / "c.safetensors"
    kvfile.save(path, cache[0], cache[1], IDENTITY)
    return path
