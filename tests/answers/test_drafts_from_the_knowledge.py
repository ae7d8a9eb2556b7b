"""Drafts from the knowledge change when an answer arrives, never what it says.

A step verifies a row's last token and its draft together; every token is still chosen from the logits one
step each would give, so an answer drafted or not, cached or not, alone or with others, is the same tokens.
Drafts that are wrong at their first token or at their last, that run past the answer's end, its
max_tokens or a stop string, change nothing. Every answer counts the draft tokens verified and taken.
"""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import SAMPLE_DOCS, SAMPLE_QUESTIONS, require_native
from serverutil import kb, url, write_docs  # noqa: F401 - fixtures

import cag
from cag import decode, drafts
from cag.engines.base import Job

QUESTIONS = [json.loads(line)["q"] for line in SAMPLE_QUESTIONS.read_text().splitlines() if line.strip()]
QUIET = dict(log=lambda _m: None)


# -- where drafts come from ------------------------------------------------------------------------------

def test_a_draft_continues_the_knowledge_or_the_answer_where_its_last_tokens_occur():
    index = drafts.Index([5, 6, 7, 8, 9, 10, 11, 12])
    d = drafts.Drafter(index, [1, 2, 6, 7], most=8)
    assert d.propose(4) == [8]  # one token first
    d.verified(1, 1)
    d.push(8)
    d.push(9)  # the model went on along the knowledge: the draft follows it, one token longer
    assert d.propose(4) == [10, 11]
    d.verified(2, 0)
    d.push(99)  # it left the knowledge: nothing matches its last tokens
    assert d.propose(4) == []
    own = drafts.Drafter(drafts.Index([]), [3, 4, 5, 6, 3, 4], most=8)
    assert own.propose(4) == [5]  # its own earlier tokens (a question's words an answer repeats)
    assert drafts.Drafter(index, [6, 7], most=0).propose(4) == []


def test_a_draft_grows_while_it_is_taken_whole_and_shrinks_to_what_was_taken():
    d = drafts.Drafter(drafts.Index(list(range(100))), [], most=5)
    sizes = []
    assert d.rate() == 0.5  # nothing verified yet
    for proposed, right in [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (5, 2), (3, 0)]:
        sizes.append(d.size)
        d.verified(proposed, right)
    assert sizes == [1, 2, 3, 4, 5, 5, 3] and d.size == 1
    assert d.rate() == (17 + 1) / (23 + 2)


def test_a_knowledge_run_whose_occurrences_go_on_differently_gives_no_draft():
    index = drafts.Index([1, 2, 3, 9, 1, 2, 4, 9, 1, 2, 5, 9, 7, 8, 6, 9, 7, 8, 6])
    assert index.after((1, 2)) is None  # followed by 3, 4 and 5: no majority
    assert index.ids[index.after((7, 8))] == 6  # followed by 6 both times


def test_drafts_are_cut_to_what_verifying_them_is_worth():
    from cag.engines.base import StepCosts

    costs = StepCosts()
    assert costs.of(3) == 1.0  # nothing measured: every size alike, a first draft is tried
    for tokens, seconds in [(1, 0.5), (2, 0.5), (3, 0.5)]:
        costs.note(tokens, seconds)  # a first forward of each size is not counted (a new graph is planned)
    assert costs.seconds == {}
    costs.note(1, 0.010)
    costs.note(2, 0.013)
    assert costs.of(2) - costs.of(1) < 0.5 * costs.of(1)  # a draft right half the time pays here
    costs.note(2, 0.015)
    costs.note(2, 0.300)  # one step slowed by other work
    costs.note(3, 0.050)
    assert costs.of(3) == 0.050 and costs.of(2) == 0.015  # the median of those kept
    assert abs(costs.of(4) - 0.050 * 1.25) < 1e-12  # past the largest measured: RISE per token


# -- wrong drafts change nothing (the sharp tiny model, the C step) ---------------------------------------

class Oracle:
    """Proposes the undrafted answer's own next tokens, spoiled where a test asks: the draft's first token,
    its last, or tokens past the answer's end."""

    def __init__(self, answer: list[int], spoil: str):
        self.answer, self.spoil, self.taken, self.calls = answer, spoil, [], 0

    def propose(self, limit: int) -> list[int]:
        self.calls += 1
        n = len(self.taken)
        draft = (self.answer + [7, 8, 9, 10] * 8)[n:n + min(limit, 4)]  # past the end: tokens that are not it
        if draft and self.spoil == "first":
            draft[0] += 1
        if len(draft) > 1 and self.spoil == "last":
            draft[-1] += 1
        return draft

    def rate(self) -> float:
        return 1.0  # always worth verifying (drafts that are not right are what is tested)

    def push(self, token: int) -> None:
        self.taken.append(token)

    def verified(self, proposed: int, right: int) -> None:
        pass


@pytest.fixture
def own_kb(cag_home, sharp_model_dir, tmp_path, monkeypatch):
    """The lantern knowledge base on a model of its own (no verdict or step costs from other tests), where
    every draft is worth verifying whatever the steps cost (the rule itself is tested above)."""
    from cag.engines.base import StepCosts
    from cag.engines.torch import models

    monkeypatch.setattr(StepCosts, "of", lambda self, tokens: 1.0)
    lm = models.load(str(sharp_model_dir), device="cpu", dtype="float32")
    return cag.build([write_docs(tmp_path / "docs")], name="lanterns", lm=lm, **QUIET)


def _tokens(kb, question: str, max_new: int, drafter=None) -> tuple[list[int], Job]:
    split = kb.fit(question, max_new_tokens=max_new)
    job = Job(list(split.new_ids), split.reuse, max_new, stops=frozenset(kb.lm.stop_ids), drafter=drafter)
    return list(decode.tokens(kb.lm.decoder(kb.prefix), job)), job


@pytest.mark.parametrize("spoil", ["none", "first", "last"])
def test_drafts_wrong_at_their_first_or_last_token_or_past_the_end_change_nothing(spoil, own_kb):
    require_native()
    for question, max_new in [("Who founded the company?", 24), ("How much is the Heron lantern?", 9)]:
        plain, _ = _tokens(own_kb, question, max_new)
        oracle = Oracle(plain, spoil)
        drafted, job = _tokens(own_kb, question, max_new, oracle)
        assert drafted == plain
        assert job.drafted > 0 and oracle.calls > 0  # drafts were verified
        if spoil == "none" and len(plain) > 4:
            assert job.accepted > 0
        if spoil == "first":
            assert job.accepted == 0


def test_a_stop_string_inside_a_draft_ends_the_answer_where_it_would_have(own_kb):
    require_native()
    plain = own_kb.ask("Who founded the company?", max_new_tokens=24, draft=0, sources=0)
    words = plain.answer.split()
    assert len(words) >= 3, plain.answer
    stop = [words[2]]
    want = own_kb.ask("Who founded the company?", max_new_tokens=24, draft=0, sources=0, stop=stop)
    got = own_kb.ask("Who founded the company?", max_new_tokens=24, sources=0, stop=stop)
    assert got.drafted > 0
    assert (got.answer, got.finish_reason) == (want.answer, want.finish_reason)
    assert want.answer != plain.answer


def test_cached_no_cache_and_batched_drafted_answers_equal_undrafted(own_kb):
    require_native()
    questions = ["Who founded the company?", "How much is the Heron lantern?", "What colour is it?",
                 "Where is the workshop?"]
    plain = [own_kb.ask(q, max_new_tokens=24, draft=0, sources=0).token_ids for q in questions]
    assert [own_kb.ask(q, max_new_tokens=24, sources=0).token_ids for q in questions] == plain
    assert [own_kb.ask(q, max_new_tokens=24, sources=0, use_cache=False).token_ids for q in questions[:2]] == plain[:2]
    together = own_kb.ask_many(questions, max_new_tokens=24, sources=0)
    assert [a.token_ids for a in together] == plain
    assert sum(a.drafted for a in together) > 0


# -- the counters, on every surface -------------------------------------------------------------------------

def test_the_server_reports_drafts_in_its_cag_object_and_metrics(url):  # noqa: F811
    require_native()
    body = {"model": "lanterns", "messages": [{"role": "user", "content": "Who founded the company?"}],
            "max_tokens": 24}
    first = httpx.post(url + "/v1/chat/completions", json=body, timeout=300).json()
    off = httpx.post(url + "/v1/chat/completions", json={**body, "cag": {"draft": False}}, timeout=300).json()
    assert first["choices"][0]["message"]["content"] == off["choices"][0]["message"]["content"]
    assert off["cag"]["draft"] == {"drafted": 0, "accepted": 0}
    got = first["cag"]["draft"]
    assert set(got) == {"drafted", "accepted"} and 0 <= got["accepted"] <= got["drafted"]
    metrics = httpx.get(url + "/metrics").text
    taken = [line for line in metrics.splitlines() if line.startswith('cag_draft_tokens_total{result="accepted"}')]
    assert taken and float(taken[0].split()[-1]) == got["accepted"]
    bad = httpx.post(url + "/v1/chat/completions", json={**body, "cag": {"draft": "yes"}}, timeout=60)
    assert bad.status_code == 400


# -- real models: every sample question ----------------------------------------------------------------

def _all_equal(kb, max_new: int, questions: list[str], many: int = 8) -> None:
    """Drafted answers equal undrafted ones, alone and each with 7 others (cached against no-cache, drafted
    both, is test_default_model_end_to_end's and test_gguf_engine's: drafts are on by default)."""
    plain = [kb.ask(q, max_new_tokens=max_new, draft=0, sources=0) for q in questions]
    drafted = [kb.ask(q, max_new_tokens=max_new, sources=0) for q in questions]
    assert [a.token_ids for a in drafted] == [a.token_ids for a in plain]
    assert sum(a.drafted for a in drafted) > 0 and sum(a.accepted for a in drafted) > 0
    together = kb.ask_many(questions[:many], max_new_tokens=max_new, sources=0)
    assert [a.token_ids for a in together] == [a.token_ids for a in plain[:many]]


@pytest.mark.real_model
def test_drafted_answers_equal_undrafted_on_every_sample_question_with_the_default_model(real_lm, cag_home):
    require_native()
    _all_equal(cag.build([SAMPLE_DOCS], name="drafts", lm=real_lm, **QUIET), 48, QUESTIONS)


@pytest.mark.parametrize("which,kv_type", [("smollm2_gguf", "f16"), ("gemma_gguf", "q8_0")])
def test_drafted_answers_equal_undrafted_on_every_sample_question_through_llama_cpp(which, kv_type, request, cag_home,
                                                                                     gguf_engines):
    """Gemma with q8_0 keys/values: with f16 (and bf16) ones, some of its answers decoded together already
    differ from alone without drafts (llama.cpp's attention for its 256-wide heads), which this does not test."""
    lm = gguf_engines(request.getfixturevalue(which), kv_type=kv_type)
    questions = QUESTIONS if which == "gemma_gguf" else QUESTIONS[:10]  # (every one: the default model's test)
    _all_equal(cag.build([SAMPLE_DOCS], name="drafts", lm=lm, **QUIET), 32, questions)
