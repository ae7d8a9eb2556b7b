"""A model let go is memory given back: closing the torch engine frees its weights at once.

The server unloads a model to keep to model_bytes by closing it; the real default model, loaded in a process
of its own, must leave that process's resident memory when closed, even though the engine object (held by
the caller here) is still referenced.
"""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = r"""
import gc, json, re
from cag import engines
from cag.server.model_pool import _give_back
def rss():
    return int(re.search(r"VmRSS:\s+(\d+) kB", open("/proc/self/status").read())[1]) << 10
lm = engines.load(None, log=lambda m: None)
held, loaded = lm.nbytes, rss()
lm.close(); gc.collect(); _give_back()
print(json.dumps({"held": held, "freed": loaded - rss(), "after": lm.nbytes}))
"""


def test_closing_the_default_model_gives_its_weights_back(cag_home):
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["held"] > 100 << 20 and got["after"] == 0
    assert got["freed"] >= 0.8 * got["held"], got
