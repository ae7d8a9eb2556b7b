"""Run in a subprocess by the store tests: load a knowledge base, count model forwards, answer questions.

Prints a JSON line when loaded, then one per question read from stdin: cache_source, how many model
forward passes the load (or the reload before this answer) ran — 0 means no prefill — and the
answer's token ids. The count comes from a forward hook on the model itself.
"""

import json
import sys

from cag import api
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
    before = calls["n"]
    kb._refresh_if_invalidated()
    reload_forwards = calls["n"] - before
    a = kb.ask(line.strip(), max_new_tokens=8)
    print(json.dumps({"cache_source": a.cache_source, "forwards": reload_forwards, "token_ids": a.token_ids}), flush=True)
