"""Progress tells the truth: a prefill reports its start before its first piece runs (with the positions
reused from an earlier cache), and the CLI's lines time the prefill from that start, apart from the reading
and tokenizing before it, so no line says "100% … 0.0 s" for a prefill that took seconds."""

from __future__ import annotations

import pytest

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


class _Clock:
    """The CLI's clock (time.perf_counter in cag.cli), moved by the test: the times it reports are exact,
    however long the machine takes to run these lines."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def pass_(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = _Clock()
    monkeypatch.setattr(cli, "time", fake)
    monkeypatch.setattr(cli._Bar, "reported", 0.0)
    return fake


def test_the_lines_time_the_prefill_from_its_start_and_say_how_long_came_before(capsys, clock):
    bar = cli._Bar()
    clock.pass_(2.0)  # reading and tokenizing
    bar(0, 100)  # the prefill starts
    clock.pass_(3.0)  # its first piece
    bar(60, 100)
    bar(100, 100)
    clock.pass_(1.0)  # the next shard's reading and tokenizing
    bar(40, 80)  # its prefill starts, 40 positions reused
    clock.pass_(0.5)
    bar(80, 80)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "prefill: 100 tokens to compute (reading and tokenizing took 2.0 s)",
        "prefill: 60% (60/100 tokens, 3.0 s)",
        "prefill: 100% (100/100 tokens, 3.0 s)",
        "prefill: 40 tokens to compute, 40 reused from the earlier cache (reading and tokenizing took 1.0 s)",
        "prefill: 100% (40/40 tokens, 0.5 s)",  # the second prefill's clock started at its own start
    ], lines


def test_loading_time_is_not_counted_as_reading(capsys, clock):
    bar = cli._Bar()
    clock.pass_(1.0)  # reading
    with cli._status("loading model tiny"):
        clock.pass_(3.0)
    bar(0, 10)
    lines = capsys.readouterr().err.splitlines()
    assert lines[-2] == "loading model tiny: done in 3.0 s", lines
    assert lines[-1] == "prefill: 10 tokens to compute (reading and tokenizing took 1.0 s)", lines
