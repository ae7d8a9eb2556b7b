"""Stop strings: kb.ask ends the answer before the first one and never streams what it cuts; StopText, which
releases only text no stop string can still claim."""

import pytest

import cag
from cag.errors import CagError
from cag.stoptext import StopText
from storeutil import make_docs


@pytest.fixture
def kb(cag_home, sharp_lm, tmp_path):
    return cag.build([make_docs(tmp_path / "docs")], name="kb", lm=sharp_lm, log=lambda _m: None)


def test_stop_strings_cut_the_answer_and_never_stream_what_they_cut(kb):
    full = kb.ask("Who founded it?", max_new_tokens=40)
    text = full.answer
    assert len(text) > 12, text  # the sharp tiny model rambles: room for a stop string in the middle
    stop = text[6:9]
    pieces = []
    cut = kb.ask("Who founded it?", max_new_tokens=40, stop=["zzz-never", stop], on_text=pieces.append)
    assert cut.answer == text[:text.find(stop)].strip()
    assert cut.finish_reason == "stop" and full.finish_reason in ("stop", "length")
    assert "".join(pieces).strip() == cut.answer and stop not in "".join(pieces)
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)]  # the same greedy answer, ended early
    uncut = kb.ask("Who founded it?", max_new_tokens=40, stop=["zzz-never"])
    assert uncut.answer == text and uncut.finish_reason == full.finish_reason


@pytest.mark.parametrize("deltas, stops, want", [
    (["Hel", "lo Wor", "ld"], ["o W"], "Hell"),
    (["abc", "d"], ["cde"], "abcd"),  # a stop prefix at the end is held back, then released at the end
    (["x", "Y", "z"], ["Yz", "xY"], ""),
    (["one ", "two"], [], "one two"),
])
def test_stop_text_releases_only_final_text(deltas, stops, want):
    cut = StopText(stops)
    out = "".join(cut.push(d) for d in deltas) + cut.flush()
    assert out == want == cut.text


def test_stop_text_checks_its_strings():
    with pytest.raises(CagError, match="at most 4"):
        StopText(["a", "b", "c", "d", "e"])
    with pytest.raises(CagError, match="non-empty"):
        StopText([""])
