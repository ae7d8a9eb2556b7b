"""What processes tell each other about knowledge bases, and how a loaded one notices.

An Event ("invalidate", "version" or "delete" of one name) is announced by the process that made the
change over the shared tier (the Redis channel `cag:events`); every other process with CAG_REDIS_URL
set listens (see cag.stores.tiered: it drops or removes its own local copies). Loaded KnowledgeBase
objects notice through a per-name generation number, bumped here, and reload before their next
answer, so no process keeps answering from a dropped, deleted or superseded cache.

This module is a leaf: the stores import it, it imports nothing of cag.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

KINDS = ("invalidate", "version", "delete")

_generations: defaultdict[str, int] = defaultdict(int)
_epoch = 0  # bumped for every name at once, after a reconnection (events may have been missed)
_lock = threading.Lock()


@dataclass(frozen=True)
class Event:
    name: str
    kind: str  # one of KINDS
    at: float = field(default_factory=time.time)
    origin: str = ""  # the store that sent it: it acted already, and does not act on its own event again

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes | str) -> "Event | None":
        """The event in a channel message, or None for anything that is not one of ours."""
        try:
            data = json.loads(raw)
            return cls(str(data["name"]), str(data.get("kind", "invalidate")), float(data.get("at") or 0.0),
                       str(data.get("origin", "")))
        except (ValueError, KeyError, TypeError, RecursionError):  # anyone may publish on the channel
            return None


def generation(name: str) -> int:
    """Changes whenever `name` is invalidated, deleted or a new version is published; KBs compare it before answering."""
    return _generations[name] + _epoch


def bump(name: str) -> None:
    with _lock:
        _generations[name] += 1


def bump_all() -> None:
    """Every loaded knowledge base re-checks its cache before its next answer."""
    global _epoch
    with _lock:
        _epoch += 1
