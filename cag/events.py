"""Invalidation events: one call drops a knowledge base's cache in every process at once.

`invalidate(name)` removes the cache from every tier this process can reach (memory, disk, Redis)
and publishes the name on the Redis channel `cag:events`. Every process with CAG_REDIS_URL set
listens on that channel (a daemon thread started with its store) and drops the name from its own
tiers (memory, host, its disk copy). Loaded KnowledgeBase objects notice through a per-name generation number and reload
before their next answer, so no process keeps answering from the dropped cache.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict

from .stores import TieredStore
from .stores.redis import EVENTS_CHANNEL

_generations: defaultdict[str, int] = defaultdict(int)
_lock = threading.Lock()
_listening: set[int] = set()


def generation(name: str) -> int:
    """Bumped whenever `name` is invalidated or a new version is published; KBs compare it before answering."""
    return _generations[name]


def bump(name: str) -> None:
    with _lock:
        _generations[name] += 1


def invalidate(name: str, store: TieredStore) -> list[str]:
    """Drop `name`'s cache everywhere and tell every other process; returns the tiers here that held it."""
    dropped = store.drop(name)
    bump(name)
    announce(name, "invalidate", store)
    return dropped


def announce(name: str, kind: str, store: TieredStore) -> None:
    redis = store.tier("redis")
    if redis is not None:
        with redis._talk():
            redis.client.publish(EVENTS_CHANNEL, json.dumps({"name": name, "kind": kind}))


def listen(store: TieredStore) -> None:
    """Subscribe `store` to the events channel once (a daemon thread; it dies with the process)."""
    redis = store.tier("redis")
    if redis is None or id(store) in _listening:
        return
    _listening.add(id(store))

    def on_message(message: dict) -> None:
        try:
            name = json.loads(message["data"])["name"]
        except (ValueError, KeyError, TypeError):
            return  # not one of ours
        store.drop(name, where=lambda tier: tier.name != "redis")  # the sender dropped the shared copy
        bump(name)

    pubsub = redis.client.pubsub(ignore_subscribe_messages=True)
    with redis._talk():
        pubsub.subscribe(**{EVENTS_CHANNEL: on_message})
    pubsub.run_in_thread(sleep_time=0.05, daemon=True, exception_handler=_stop_quietly)


def _stop_quietly(error: Exception, pubsub, thread) -> None:
    """Redis went away: stop listening instead of printing tracebacks from a background thread."""
    thread.stop()
