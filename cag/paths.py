"""Where cag keeps things: one home folder, overridable with CAG_HOME (tests point it at a temp dir)."""

from __future__ import annotations

import os
import re
from pathlib import Path

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


def writable(folder: Path) -> Path:
    """`folder` after checking that it, or the folder it would be created in, can be written (before any
    prefill, which can take minutes). Nothing is created here, so a refused build leaves nothing behind."""
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "is not a folder" if probe.exists() and not probe.is_dir() else "is not writable"
        raise CagError(f"cannot store knowledge bases under {home()}: {probe} {why}; point CAG_HOME at a "
                       "writable folder")
    return folder
