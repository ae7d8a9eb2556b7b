"""The one logging convention: progress and warnings are a `Log`, a function given one line of text.

Why a function and not the logging module: the CLI shows these lines under its status display, the server
sends them to its access log, and tests collect them in a list; each caller passes where its lines go.
Without one, they go to stderr.
"""

from __future__ import annotations

import sys
from typing import Callable

Log = Callable[[str], None]


def stderr(msg: str) -> None:
    """The default Log: one line on stderr, written at once."""
    print(msg, file=sys.stderr, flush=True)
