"""Run in a subprocess by the store tests: load a knowledge base, count model forwards, answer questions.

Prints a JSON line when loaded, then one per question read from stdin: cache_source, how many model
forward passes the load (or the reload before this answer) ran — 0 means no prefill — and the
answer's token ids. The count comes from a forward hook on the model itself.

Two lines are commands, not questions: "!generation" prints {"generation": N}, the knowledge base's event
generation in this process (cag.cache.events); "!await N" waits until it is past N (an event from another
process reached this one's listener, which acted on it first), for at most 60 s, and prints it.
"""

import json
import sys
import time

from cag import api
from cag.cache import events
from cag.engines.torch import models

name = sys.argv[1]
meta = api.read_meta(name)
lm = models.load(meta["model"], dtype=meta.get("dtype"))
calls = {"n": 0}
lm.model.register_forward_pre_hook(lambda module, args: calls.__setitem__("n", calls["n"] + 1))

kb = api.load(name, lm=lm, log=lambda m: print(m, file=sys.stderr))
print(json.dumps({"ready": True, "cache_source": kb.cache_source, "forwards": calls["n"]}), flush=True)
for line in sys.stdin:
    if not line.strip():
        continue
    if line.startswith("!"):
        command, *args = line.split()
        if command == "!await":
            deadline = time.monotonic() + 60
            while events.generation(name) <= int(args[0]) and time.monotonic() < deadline:
                time.sleep(0.01)
        print(json.dumps({"generation": events.generation(name)}), flush=True)
        continue
    before = calls["n"]
    kb._refresh_if_invalidated()
    reload_forwards = calls["n"] - before
    a = kb.ask(line.strip(), max_new_tokens=8)
    print(json.dumps({"cache_source": a.cache_source, "forwards": reload_forwards, "token_ids": a.token_ids}), flush=True)
