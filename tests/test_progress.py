"""Progress tells the truth: a prefill reports its start before its first piece runs (with the positions
reused from an earlier cache), and the CLI's lines time the prefill from that start, apart from the reading
and tokenizing before it, so no line says "100% … 0.0 s" for a prefill that took seconds."""

from __future__ import annotations

import re
import time

import cag
from cag import cli
from cag.engines.torch import kvcompat
from serverutil import write_docs


def test_a_prefill_reports_its_start_before_its_first_piece_and_each_piece_after_it(cag_home, tiny_lm, tmp_path,
                                                                                    monkeypatch):
    events = []
    forward = kvcompat.forward

    def piece(model, ids, cache):
        events.append(("piece", ids.shape[-1]))
        return forward(model, ids, cache)

    monkeypatch.setattr(kvcompat, "forward", piece)
    docs = write_docs(tmp_path / "docs")
    kb = cag.build([docs], name="kb", lm=tiny_lm, chunk_size=32, log=lambda _m: None,
                   progress=lambda done, total: events.append(("progress", done, total)))
    total = kb.tokens
    assert events[0] == ("progress", 0, total)  # before any piece ran
    pieces = [e for e in events if e[0] == "piece"]
    assert len(pieces) == -(-total // 32) and events[1::2] == pieces  # then one report after each piece
    assert events[-1] == ("progress", total, total)

    events.clear()
    (docs / "c.md").write_text("The Egret lamp is green and costs 12 crowns.")
    again = cag.build([docs], name="kb", lm=tiny_lm, chunk_size=32, log=lambda _m: None,
                      progress=lambda done, total: events.append(("progress", done, total)))
    stats = again.build_stats
    assert stats.reused > 0 and events[0] == ("progress", stats.reused, again.tokens)  # reuse, reported first
    assert events[1][0] == "piece" and events[-1] == ("progress", again.tokens, again.tokens)


def _seconds(line: str) -> float:
    return float(re.search(r"([\d.]+) s\)$", line).group(1))


def test_the_lines_time_the_prefill_from_its_start_and_say_how_long_came_before(capsys):
    bar = cli._Bar()
    time.sleep(0.2)  # reading and tokenizing
    bar(0, 100)  # the prefill starts
    time.sleep(0.3)  # its first piece
    bar(60, 100)
    bar(100, 100)
    time.sleep(0.1)  # the next shard's reading and tokenizing
    bar(40, 80)  # its prefill starts, 40 positions reused
    bar(80, 80)
    lines = capsys.readouterr().err.splitlines()
    assert [re.sub(r"[\d.]+ s\)", "_ s)", line) for line in lines] == [
        "prefill: 100 tokens to compute (reading and tokenizing took _ s)",
        "prefill: 60% (60/100 tokens, _ s)",
        "prefill: 100% (100/100 tokens, _ s)",
        "prefill: 40 tokens to compute, 40 reused from the earlier cache (reading and tokenizing took _ s)",
        "prefill: 100% (40/40 tokens, _ s)",
    ], lines
    assert _seconds(lines[0]) >= 0.2 and _seconds(lines[1]) >= 0.3 and _seconds(lines[3]) >= 0.1
    assert _seconds(lines[4]) < 0.3  # the second prefill's clock started at its own start


def test_loading_time_is_not_counted_as_reading(capsys):
    bar = cli._Bar()
    with cli._status("loading model tiny"):
        time.sleep(0.3)
    bar(0, 10)
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("prefill: 10 tokens to compute") and _seconds(line) < 0.3, line
