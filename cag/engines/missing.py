"""Messages for a model that is not where it was named, or is not a model: what is wrong and what to do.

Shared by both engines, since a user who mistypes a path does not know which engine the name went to."""

from __future__ import annotations

import difflib
from pathlib import Path

from ..errors import ModelError, ModelMissingError

KINDS = "a model is a GGUF file, a Hugging Face folder holding config.json, or ollama:NAME[:TAG]"


def no_model_at(path: Path) -> ModelMissingError:
    """Nothing at `path`: say so, and name the closest file or folder beside it when there is one."""
    parent = path.parent
    if not parent.is_dir():
        return ModelMissingError(f"no model at {path}: the folder {parent} does not exist ({KINDS})")
    names = [p.name for p in parent.iterdir()]
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    hint = f"; did you mean {parent / close[0]}?" if close else f" ({KINDS})"
    return ModelMissingError(f"no model at {path}: no such file or folder{hint}")


def not_a_model(path: Path) -> ModelError:
    """`path` exists but is neither a GGUF file nor a Hugging Face folder: say what it is instead."""
    if path.is_dir():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))[:3]
        inside = f"; it holds {', '.join(ggufs)}: name that file instead" if ggufs else ""
        return ModelError(f"{path} is a folder without config.json, so not a Hugging Face model{inside} ({KINDS})")
    with open(path, "rb") as f:
        head = f.read(4)
    return ModelError(f"{path} is a file but not a GGUF model (it starts with {head!r}, not b'GGUF'); {KINDS}")
