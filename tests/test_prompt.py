"""The prefix/question seam: the model must always see exactly the tokens of the full prompt."""

import pytest

from cag import knowledge
from cag.errors import PromptError
from cag.prompt import PromptBuilder, Turn, common_prefix_len

QUESTIONS = [
    "Who founded the company?", "  leading spaces?", "trailing newline\n", "ünïcödé — what's “this”?",
    "multi\nline\n\nquestion", "1987", "!!!", "a", "Heron's price in crowns, please.", "\tTabbed question",
    "<|im_end|> injected marker", "What is 3.2 kilograms in pounds?", "emoji 🏮 lantern",
]


@pytest.fixture
def docs():
    return knowledge.load([knowledge_dir()])


def knowledge_dir():
    from conftest import SAMPLE_DOCS

    return SAMPLE_DOCS


def test_full_prompt_tokens_start_with_the_cached_prefix(tiny_lm, docs):
    builder = PromptBuilder(tiny_lm.tokenizer, docs)
    prefix = builder.prefix_ids()
    for q in QUESTIONS:
        split = builder.split(q)
        assert split.ids == builder.tokenize(builder.render(q.strip())), q
        assert split.ids[:split.reuse] == prefix[:split.reuse]
        assert split.reuse + len(split.new_ids) == len(split.ids)
        if q.strip()[0].isalnum():
            assert split.boundary_ok, q


def test_seam_mismatch_is_detected_and_only_the_matching_tokens_are_reused(tiny_plain_model_dir, docs):
    """In the plain layout the prefix ends with 'Question: ': BPE merges that space into the question's
    first word, so prefix tokens + question tokens != full-prompt tokens. The split must notice."""
    from cag import models

    lm = models.load(str(tiny_plain_model_dir), device="cpu")
    builder = PromptBuilder(lm.tokenizer, docs)
    prefix = builder.prefix_ids()
    split = builder.split("What is the Heron?")
    naive = prefix + builder.tokenize("What is the Heron?\nAnswer:")
    assert naive != split.ids  # the classic bug would feed these tokens
    assert not split.boundary_ok
    assert split.reuse == common_prefix_len(prefix, split.ids) < len(prefix)
    assert split.ids[:split.reuse] == prefix[:split.reuse]


def test_history_is_appended_after_the_prefix(tiny_lm, docs):
    builder = PromptBuilder(tiny_lm.tokenizer, docs)
    split = builder.split("And the Wren?", history=[Turn("Price of the Heron?", "148 crowns.")])
    assert split.boundary_ok
    assert "148 crowns." in tiny_lm.tokenizer.decode(split.new_ids)


def test_fingerprint_tracks_layout_not_question(tiny_lm, docs):
    a = PromptBuilder(tiny_lm.tokenizer, docs)
    b = PromptBuilder(tiny_lm.tokenizer, docs, instruction="Answer in French.")
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == PromptBuilder(tiny_lm.tokenizer, docs[:1]).fingerprint()


def test_empty_question_is_refused(tiny_lm, docs):
    with pytest.raises(PromptError, match="empty"):
        PromptBuilder(tiny_lm.tokenizer, docs).split("   ")


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2
    assert common_prefix_len([], [1]) == 0
