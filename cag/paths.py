"""Where cag keeps things: one home folder, overridable with CAG_HOME (tests point it at a temp dir)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from .errors import CagError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def home() -> Path:
    from .settings import current

    return current().home


def models_dir() -> Path:
    return home() / "models"


def kbs_dir() -> Path:
    return home() / "kbs"


def kb_dir(name: str) -> Path:
    """The folder of one knowledge base; the name is checked so it can never escape CAG_HOME."""
    if not _NAME.match(name):
        raise CagError(
            f"invalid knowledge base name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return kbs_dir() / name


def shared_models_dir() -> Path:
    """Where one user's homes share converted models (the default model is converted from its GGUF once, not
    once per CAG_HOME): beside the default home, in the user's own cache folder. Each copy there carries the
    fingerprint it was converted with and is verified against it before another home takes it."""
    return Path.home() / ".cache" / "cag" / "shared-models"


def writable(folder: Path, log: Callable[[str], None] | None = None, what: str = "knowledge bases") -> Path:
    """`folder` after checking that it, or the folder it would be created in, can be written: before any
    work (a prefill or a model conversion can take minutes). A CAG_HOME that does not exist yet is created
    here, and `log` says so in one line (a mistyped CAG_HOME shows at once); nothing else is created, so a
    refused command leaves nothing behind."""
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "is not a folder" if probe.exists() and not probe.is_dir() else "is not writable"
        raise CagError(f"cannot store {what} under {home()}: {probe} {why}; point CAG_HOME at a writable folder")
    where = home()
    if not where.exists():
        where.mkdir(parents=True, exist_ok=True)
        if log is not None:
            log(f"CAG_HOME {where} did not exist: created it (knowledge bases and converted models are kept there)")
    return folder
