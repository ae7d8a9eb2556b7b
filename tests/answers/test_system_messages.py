"""System messages: honoured after the cached knowledge (KnowledgeBase.ask(system=), the server's system and
developer messages, `cag ask/chat --system`), the cache still valid, the answer still the no-cache one."""

from __future__ import annotations

import io
import json

import httpx
import pytest
import torch

import cag
from cag import cli
from cag.scheduler import Batching
from cag.server import ServerConfig, create_app
from serverutil import kb, serving  # noqa: F401 - fixtures
from storeutil import make_docs

QUESTION = "Who founded the company?"
SYSTEM = "Answer in the voice of a lighthouse keeper, and mention the Heron lantern's price."
OTHER = "Reply with a list of dates only."
MAX = 12


def test_a_system_message_answers_from_the_cache_as_the_reference_does(kb):
    before = [(k.clone(), v.clone()) for k, v in kb.layers]
    plain = kb.ask(QUESTION, max_new_tokens=MAX)
    told = kb.ask(QUESTION, max_new_tokens=MAX, system=SYSTEM)
    reference = kb.ask(QUESTION, max_new_tokens=MAX, system=SYSTEM, use_cache=False)
    batched = kb.ask(QUESTION, max_new_tokens=MAX, system=SYSTEM, batching=Batching())
    assert told.token_ids == reference.token_ids == batched.token_ids
    assert told.token_ids != plain.token_ids  # the model did see it
    assert kb.tokens - 8 <= told.cached_tokens < kb.tokens  # the cache serves all but the prefix's last tokens
    assert told.prompt_tokens == reference.prompt_tokens > plain.prompt_tokens
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(kb.layers, before))
    again = kb.ask(QUESTION, max_new_tokens=MAX)
    assert again.token_ids == plain.token_ids and again.cached_tokens == kb.tokens


def _chat(base: str, messages: list[dict]) -> dict:
    r = httpx.post(base + "/v1/chat/completions", timeout=60, json={"model": "lanterns", "max_tokens": MAX,
                                                                    "messages": messages})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_server_honours_system_messages_and_caches_answers_by_them(kb, sharp_lm):
    user = {"role": "user", "content": QUESTION}
    with serving(create_app(ServerConfig(semantic_threshold=None), sharp_lm)) as base:
        told = _chat(base, [{"role": "system", "content": SYSTEM}, user])
        assert told["choices"][0]["message"]["content"] == kb.ask(QUESTION, max_new_tokens=MAX, system=SYSTEM).answer
        assert told["usage"]["prompt_tokens"] == len(kb.fit(QUESTION, max_new_tokens=MAX, system=SYSTEM).ids)
        # developer messages count too, joined in order; another system message is another answer, not a cache hit
        other = _chat(base, [{"role": "developer", "content": OTHER}, user])
        assert other["cag"]["response_cache"] is None
        assert other["choices"][0]["message"]["content"] == kb.ask(QUESTION, max_new_tokens=MAX, system=OTHER).answer
        plain = _chat(base, [user])
        assert plain["cag"]["response_cache"] is None
        assert plain["choices"][0]["message"]["content"] == kb.ask(QUESTION, max_new_tokens=MAX).answer
        both = _chat(base, [{"role": "system", "content": SYSTEM}, {"role": "developer", "content": OTHER}, user])
        assert both["choices"][0]["message"]["content"] == \
            kb.ask(QUESTION, max_new_tokens=MAX, system=f"{SYSTEM}\n\n{OTHER}").answer
        repeat = _chat(base, [{"role": "system", "content": SYSTEM}, user])
        assert repeat["cag"]["response_cache"] == "exact"
        assert repeat["choices"][0]["message"]["content"] == told["choices"][0]["message"]["content"]


def test_cag_ask_and_chat_take_a_system_message(kb, capsys, monkeypatch):
    want = kb.ask(QUESTION, max_new_tokens=MAX, system=SYSTEM)
    assert want.answer != kb.ask(QUESTION, max_new_tokens=MAX).answer
    cli.app(["ask", "lanterns", QUESTION, "--system", SYSTEM, "--json", "--max-new-tokens", str(MAX)],
            standalone_mode=False)
    got = json.loads(capsys.readouterr().out)
    assert got["answer"] == want.answer and got["cached_tokens"] == want.cached_tokens
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n/exit\n"))
    cli.app(["chat", "lanterns", "--system", SYSTEM, "--max-new-tokens", str(MAX)], standalone_mode=False)
    assert capsys.readouterr().out.split("cag> ", 1)[1].split("\nyou> ")[0].strip() == want.answer


@pytest.mark.parametrize("which", ["torch", pytest.param("smollm2 gguf", marks=pytest.mark.gguf),
                                   pytest.param("gemma gguf (base, plain layout)", marks=pytest.mark.gguf)])
def test_a_system_message_on_real_models_answers_as_the_reference_does(which, request, cag_home, tmp_path):
    """The default model (transformers, and its GGUF through llama.cpp: a chat template with a system role)
    and Gemma 3 270M base (no template: the plain layout): the system message is read after the cache (and
    changes the instruction-tuned model's answer), and the cached answer equals the no-cache one."""
    if which == "torch":
        lm = request.getfixturevalue("real_lm")
    else:
        path = request.getfixturevalue("smollm2_gguf" if which.startswith("smollm2") else "gemma_gguf")
        lm = request.getfixturevalue("gguf_engines")(path)
    kb = cag.build([make_docs(tmp_path / "docs")], name="real", lm=lm, log=lambda _m: None)
    q = "Who founded Quillfeather?"
    told = kb.ask(q, max_new_tokens=24, system="Answer in French, in capital letters.")
    assert told.token_ids == kb.ask(q, max_new_tokens=24, system="Answer in French, in capital letters.",
                                    use_cache=False).token_ids
    plain = kb.ask(q, max_new_tokens=24)
    assert told.question_tokens > plain.question_tokens  # the system text is in the prompt, after the cache
    if "base" not in which:  # an instruction-tuned model follows it; a 270M base model may well not
        assert told.token_ids != plain.token_ids
    assert kb.tokens - 8 <= told.cached_tokens < kb.tokens
