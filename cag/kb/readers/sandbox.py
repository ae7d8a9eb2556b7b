"""Reading one document in a child process held to limits (child.py), and turning how it ended into text
or a KnowledgeError that names the file and the limit it passed."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from ...errors import KnowledgeError
from . import child

_KILLED = (-getattr(signal, "SIGXCPU", 24), -getattr(signal, "SIGKILL", 9))


def read(fmt: str, path: Path, limits: Sequence[int], memory: int, seconds: int, label: str) -> str:
    """The text of `path` read by the child's `fmt` reader; `label` names the kind of file in messages."""
    slow = KnowledgeError(f"refused to read {path}: parsing it took more than {seconds} s (the limit per "
                          f"{label}); it may be malformed or built to be slow")
    command = [sys.executable, "-I", child.__file__, fmt, str(path), str(memory), str(seconds), *map(str, limits)]
    try:
        done = subprocess.run(command, capture_output=True, timeout=2 * seconds + 10, check=False)
    except subprocess.TimeoutExpired:
        raise slow from None
    except OSError as err:
        raise KnowledgeError(f"cannot read {path}: no process to parse it in ({err.strerror or err})") from None
    reason = (done.stderr.decode("utf-8", errors="replace").strip().splitlines() or ["no reason given"])[-1]
    if done.returncode == child.REFUSED:
        raise KnowledgeError(f"refused to read {path}: {reason}")
    if done.returncode in _KILLED:
        raise slow
    if done.returncode != 0:
        raise KnowledgeError(f"cannot parse {path}: {reason}")
    return done.stdout.decode("utf-8")
