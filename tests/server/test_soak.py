"""Soak: 8 concurrent clients for a minute on two tenants' knowledge bases of the same name.

Every answer must equal the sequential answer for that tenant's knowledge and that request's seed
(no cross-request or cross-tenant leakage), and nothing may error. Bounded in time and count; loopback only.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

import cag
from cag.sampling import Sampling
from cag.server import ServerConfig, create_app
from serverutil import serving

KEYS = {"key-a": "alpha", "key-b": "beta"}
DOCS = {"alpha": "The alpha vault code is 4417 and the otter is named Zephyrine.",
        "beta": "The beta vault code is 9902 and the heron is named Ottoline."}
QUESTIONS = ["What is the vault code?", "What is the animal called?", "Summarize the note.", "Who guards it?"]
SOAK_SECONDS = int(__import__("os").environ.get("CAG_SOAK_SECONDS", "60"))
MAX_REQUESTS = 2000
MAX = 8


@pytest.fixture
def url(cag_home, sharp_lm):
    with serving(create_app(ServerConfig(api_keys=KEYS, response_cache=False, workers=4), sharp_lm)) as base:
        for key, tenant in KEYS.items():
            r = httpx.post(base + "/v1/kbs", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                           json={"name": "notes", "documents": [{"name": "note.md", "text": DOCS[tenant]}]})
            assert r.status_code == 201, r.text
        yield base


def test_eight_clients_for_a_minute_no_errors_no_leakage(url, sharp_lm):
    expected = {}
    for key, tenant in KEYS.items():
        kb = cag.load(f"{tenant}__notes", lm=sharp_lm, log=lambda _m: None)
        for i, q in enumerate(QUESTIONS):
            for seed in range(3):
                expected[(key, q, seed)] = kb.ask(q, max_new_tokens=MAX, sampling=Sampling(temperature=1.0, seed=seed)).answer
    assert len({v for (k, _q, _s), v in expected.items() if k == "key-a"} - {v for (k, _q, _s), v in expected.items() if k == "key-b"}) > 0

    failures: list[str] = []
    done = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + SOAK_SECONDS

    def client(worker: int) -> None:
        with httpx.Client(timeout=120) as http:
            n = 0
            while n < 2 or time.monotonic() < stop_at:  # every client asks twice at least, however slow the machine
                with lock:
                    if done[0] >= MAX_REQUESTS:
                        return
                    done[0] += 1
                key = ("key-a", "key-b")[(worker + n) % 2]
                q, seed = QUESTIONS[(worker * 7 + n) % len(QUESTIONS)], n % 3
                stream = n % 2 == 1
                n += 1
                body = {"model": "notes", "max_tokens": MAX, "temperature": 1.0, "seed": seed, "stream": stream,
                        "messages": [{"role": "user", "content": q}]}
                try:
                    r = http.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                    if r.status_code != 200:
                        failures.append(f"{r.status_code}: {r.text[:200]}")
                        continue
                    if stream:
                        text = "".join(
                            (json.loads(line[6:])["choices"] or [{"delta": {}}])[0]["delta"].get("content") or ""
                            for line in r.text.splitlines() if line.startswith("data: {"))
                        text = text.strip()
                    else:
                        text = r.json()["choices"][0]["message"]["content"]
                    if text != expected[(key, q, seed)]:
                        failures.append(f"leak/mismatch for {key} {q!r} seed {seed} stream={stream}: {text!r} != {expected[(key, q, seed)]!r}")
                except Exception as err:  # noqa: BLE001 - every failure is collected and reported
                    failures.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SOAK_SECONDS + 180)
    assert not failures, failures[:5]
    assert done[0] >= 16, f"only {done[0]} requests were made"
