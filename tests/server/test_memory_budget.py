"""A server keeps to its memory budget: models and the knowledge bases loaded on them, under model_bytes.

A real `cag serve` process with six knowledge bases, two on each of three GGUF models (SmolLM2 and written
Llama- and Qwen2-shaped ones), and a budget that fits one model with one knowledge base: concurrent clients
ask all six, every answer equals the one-at-a-time answer, and the server's resident memory (sampled from
/proc) stays within what it held before any model loaded plus the budget plus a stated overhead. /metrics
shows what each loaded model holds. A model file removed meanwhile is a 503 the next time it has to load.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

import cag
from serverutil import Replica, write_docs

OVERHEAD = 64 << 20  # beyond the budget: llama.cpp's library and thread pools, allocator slack, request buffers
CONTEXT = 1024
DOCS = {"lanterns": {"a.md": "# Lanterns\nThe Heron lantern costs 148 crowns and is blue.",
                     "b.txt": "Quillfeather was founded in 1987 by Odalys Renn."},
        "ferries": {"ferry.md": "# Ferries\nThe night ferry to Orlan leaves at 23:40 from pier 9.",
                    "crew.txt": "Captain Ysolde Marr has steered the Orlan ferry since 2011."},
        "orchard": {"trees.md": "# Orchard\nThe orchard grows 312 pear trees and 40 quince trees.",
                    "keeper.txt": "Tobiah Fenn keeps the orchard's bees in 12 hives."},
        "mill": {"mill.md": "# The mill\nThe windmill at Cray grinds 900 kg of rye a day.",
                 "miller.txt": "Edda Lorne has run the mill since 1999."},
        "harbour": {"harbour.md": "# Harbour\nThe harbour has 7 berths and a lighthouse 41 m tall.",
                    "master.txt": "Harbour master Quin Alder keeps the tide tables."},
        "library": {"shelves.md": "# Library\nThe library lends 18,000 books and 600 maps.",
                    "keeper.txt": "Librarian Sabe Rook catalogued the maps in 2019."}}
MODELS = ("lanterns", "ferries", "orchard")  # the first three each bring their model; the other three share them
QUESTIONS = ["Who is mentioned?", "What number appears first?", "Summarise it in five words."]


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read())[1]) << 10


@pytest.fixture
def three_models(tmp_path, cag_home, smollm2_gguf, tiny_llama_gguf, tiny_qwen2_gguf, gguf_engines):
    """Three knowledge bases in `cag_home`, one per model; each model file a copy of its own (one is removed)."""
    built, sizes = {}, {}
    for i, (kb, docs) in enumerate(DOCS.items()):
        model = tmp_path / "models" / f"{MODELS[i % 3]}.gguf"
        if not model.exists():
            model.parent.mkdir(exist_ok=True)
            shutil.copy((smollm2_gguf, tiny_llama_gguf, tiny_qwen2_gguf)[i], model)
        lm = gguf_engines(model, context=CONTEXT)
        built[kb] = cag.build([write_docs(tmp_path / kb, docs)], name=kb, model=str(model), lm=lm, log=lambda _m: None)
        sizes[kb] = lm.nbytes + built[kb].nbytes
    return built, sizes


def test_three_models_under_a_budget_that_fits_one(three_models, cag_home, tmp_path, tiny_qwen2_gguf):
    built, sizes = three_models
    budget = int(max(sizes.values()) * 1.05)  # the largest model with one knowledge base, no more
    assert sum(sizes.values()) > budget + OVERHEAD  # all three at once would not keep to it
    want = {(kb, q): built[kb].ask(q, max_new_tokens=12).answer for kb in DOCS for q in QUESTIONS}
    config = tmp_path / "server.json"
    # the server's own model, loaded at start and in the baseline, is a small one that no knowledge base here uses
    config.write_text(json.dumps({"model_bytes": budget, "response_cache": False, "workers": 8,
                                  "model": str(tiny_qwen2_gguf)}))
    server = Replica(cag_home, config, {"CAG_THREADS": "1"}).start()
    try:
        baseline = _rss(server.proc.pid)
        peak, stop = [baseline], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _rss(server.proc.pid))
                time.sleep(0.02)

        got, errors = {}, []

        def client(i: int) -> None:
            with httpx.Client(timeout=600) as http:
                for n in range(6):
                    kb, q = list(DOCS)[(i + n) % 6], QUESTIONS[(i * 2 + n) % 3]
                    body = {"model": kb, "max_tokens": 12, "stream": bool(n % 2),
                            "messages": [{"role": "user", "content": q}]}
                    r = http.post(server.url + "/v1/chat/completions", json=body)
                    if r.status_code != 200:
                        errors.append(r.text)
                    elif not body["stream"]:
                        got[(kb, q, i, n)] = r.json()["choices"][0]["message"]["content"]

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        clients = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(900)
        metrics = httpx.get(server.url + "/metrics").text
        stop.set()
        sampler.join(5)
        assert not errors, errors[:3]
        assert got and all(answer == want[key[:2]] for key, answer in got.items())
        grew = peak[0] - baseline
        assert grew <= budget + OVERHEAD, f"RSS grew {grew >> 20} MB over a budget of {budget >> 20} MB"
        held = sum(float(m[1]) for m in re.finditer(r'^cag_model_bytes\{[^}]*\} (\S+)$', metrics, re.M))
        assert 0 < held <= budget, metrics
        assert "unloaded model" in server.log.read_text()  # models did take turns

        models = tmp_path / "models"
        (models / "orchard.gguf").unlink()  # a model file removed while the server runs
        shutil.copy(models / "lanterns.gguf", models / "ferries.tmp")
        (models / "ferries.tmp").replace(models / "ferries.gguf")  # and one replaced by another model
        codes = {}
        for kb in ("lanterns", "ferries", "orchard", "mill"):  # each model fills the budget: the others have left
            r = httpx.post(server.url + "/v1/chat/completions", timeout=600, json={
                "model": kb, "max_tokens": 4, "messages": [{"role": "user", "content": "Who?"}]})
            codes[kb] = (r.status_code, r.json().get("error", {}).get("code"))
        assert codes == {"lanterns": (200, None), "ferries": (503, "model_unavailable"),
                         "orchard": (503, "model_unavailable"), "mill": (200, None)}, codes
    finally:
        server.stop()
