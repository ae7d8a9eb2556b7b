"""`cag ask` and `cag chat` show each answer's sources and whether they support it: the real CLI on the sample
knowledge base and the real default model (a fictional lantern maker, so "the capital of France" can never be
supported by it, while its chief executive is named in it)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cag
from cag import cli, cli_render
from cag.kb import grounding
from cag.kb.grounding import REFUSAL, Source
from cag.results import Answer
from conftest import SAMPLE_DOCS
from cliutil import run

KB = "sample-sources"
CEO = "Who is the current chief executive?"  # answered from 01_company.md / 04_history.txt: supported
FRANCE = "What is the capital of France?"  # nothing in the sample knowledge holds it: unsupported
SOURCE_LINE = re.compile(r"^\[(\d+)\] (\S+) › (.+)  \((\d\.\d\d)\)$")
SOURCE_KEYS = {"document", "locator", "snippet", "score", "page", "lines", "heading"}
DOC_NAMES = {p.name for p in SAMPLE_DOCS.iterdir()}


def questions_file(tmp_path: Path, *qs: str) -> Path:
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"q": q}) + "\n" for q in qs))
    return path


def source_blocks(stderr: str) -> list[list[str]]:
    """stderr cut after each answer's own lines (the answer's timing line ends them); the loading lines
    before the first answer are left out."""
    blocks, block = [], []
    for line in stderr.splitlines():
        if line.startswith(("[cache]", "[no-cache]")):
            blocks.append([b for b in block if not b.startswith("loading model")])
            block = []
        else:
            block.append(line)
    return blocks


def numbered(block: list[str]) -> list[re.Match]:
    return [m for m in map(SOURCE_LINE.match, block) if m]


@pytest.fixture(scope="module")
def home(real_home, real_lm) -> Path:
    """The sample knowledge base, built once in the real-model home (where the default model is converted)."""
    old = os.environ.get("CAG_HOME")
    os.environ["CAG_HOME"] = str(real_home)
    try:
        cag.build([SAMPLE_DOCS], name=KB, lm=real_lm)
    finally:
        if old is None:
            os.environ.pop("CAG_HOME", None)
        else:
            os.environ["CAG_HOME"] = old
    return real_home


# -- the real CLI, the real model ----------------------------------------------------------------------

@pytest.mark.real_model
def test_text_shows_sources_on_stderr_and_warns_only_for_the_unsupported_answer(home, tmp_path):
    proc = run(["ask", KB, "-q", questions_file(tmp_path, CEO, FRANCE), "--max-new-tokens", "32"], home)
    # stdout holds the questions and answers alone: what a pipe gets
    assert "Marrek Solvang" in proc.stdout and "Paris" in proc.stdout, proc.stdout
    assert not any(SOURCE_LINE.match(line) for line in proc.stdout.splitlines()), proc.stdout
    assert cli_render.WARNING not in proc.stdout
    ceo, france = source_blocks(proc.stderr)
    for block in (ceo, france):
        found = numbered(block)
        assert [int(m.group(1)) for m in found] == [1, 2, 3], block
        assert all(m.group(2) in DOC_NAMES for m in found), block
        snippets = [line for line in block if line.startswith(cli_render.INDENT)]
        assert snippets and all(len(line) <= 80 for line in snippets), block  # wrapped for 80 columns (a pipe)
    ceo_text = " ".join(line.strip() for line in ceo)
    assert "Marrek Solvang" in ceo_text, ceo  # a source that holds the answer is shown with it
    assert not any(cli_render.WARNING in line for line in ceo), ceo
    warned = [line for line in france if line.startswith(cli_render.WARNING)]
    assert len(warned) == 1 and warned[0].endswith(": check the sources") and "(support 0." in warned[0], france


@pytest.mark.real_model
def test_json_has_sources_and_support_and_refuse_replaces_only_the_unsupported_answer(home, tmp_path):
    """--json on the --questions path: every answer's sources and support; then refuse mode."""
    qfile = questions_file(tmp_path, CEO, FRANCE)
    flag = [json.loads(line) for line in
            run(["ask", KB, "-q", qfile, "--json", "--max-new-tokens", "32"], home).stdout.splitlines()]
    assert [r["question"] for r in flag] == [CEO, FRANCE]
    for row in flag:
        assert "token_ids" not in row and row["generated"] is None and row["grounding_s"] >= 0
        assert len(row["sources"]) == 3 and all(set(s) == SOURCE_KEYS for s in row["sources"]), row
        for s in row["sources"]:
            assert s["document"] in DOC_NAMES and 0 <= s["score"] <= 1 and s["snippet"].strip()
            assert isinstance(s["lines"], list) and len(s["lines"]) == 2 and isinstance(s["heading"], list)
        scores = [s["score"] for s in row["sources"]]
        assert scores == sorted(scores, reverse=True), scores
    ceo, france = flag
    assert ceo["supported"] is True and ceo["support"] >= grounding.SUPPORTED_AT and "Marrek Solvang" in ceo["answer"]
    assert france["supported"] is False and france["support"] < grounding.SUPPORTED_AT and "Paris" in france["answer"]
    # refusing, with no sources shown: the support is still measured, the same
    refusing = ["ask", KB, "-q", qfile, "--json", "--max-new-tokens", "32", "--unsupported", "refuse", "--sources", "0"]
    refused = [json.loads(line) for line in run(refusing, home).stdout.splitlines()]
    assert len(refused) == 2 and all(r["sources"] == [] for r in refused), refused
    assert [(r["supported"], r["support"]) for r in refused] == [(r["supported"], r["support"]) for r in flag]
    assert refused[0]["answer"] == ceo["answer"] and refused[0]["generated"] is None
    assert refused[1]["answer"] == REFUSAL and refused[1]["generated"] == france["answer"]


@pytest.mark.real_model
def test_sources_0_shows_none_but_still_warns_on_the_no_cache_path_too(home):
    proc = run(["ask", KB, FRANCE, "--max-new-tokens", "32", "--sources", "0", "--no-cache"], home)
    assert "Paris" in proc.stdout and "[no-cache]" in proc.stderr, proc.stderr
    (block,) = source_blocks(proc.stderr)
    assert numbered(block) == [] and not any(line.startswith(cli_render.INDENT) for line in block), block
    warned = [line for line in block if line.startswith(cli_render.WARNING)]
    assert len(warned) == 1 and "check the sources" not in warned[0], block


@pytest.mark.real_model
def test_chat_shows_sources_and_refuses_only_the_unsupported_answer(home):
    proc = run(["chat", KB, "--max-new-tokens", "32", "--sources", "2", "--unsupported", "refuse"], home,
               stdin=f"{CEO}\n{FRANCE}\n/exit\n")
    answers = [line.split("cag> ", 1)[1] for line in proc.stdout.splitlines() if "cag> " in line]
    assert len(answers) == 2 and "Marrek Solvang" in answers[0], proc.stdout
    assert answers[1] == REFUSAL and "Paris" not in proc.stdout, proc.stdout  # the refused text never streams
    found = [m.group(1) for m in map(SOURCE_LINE.match, proc.stderr.splitlines()) if m]
    assert found == ["1", "2", "1", "2"], proc.stderr
    warned = [line for line in proc.stderr.splitlines() if line.startswith(cli_render.WARNING)]
    assert len(warned) == 1 and "replaced" in warned[0], proc.stderr


# -- flags, errors, help (no model) --------------------------------------------------------------------

def test_bad_sources_or_unsupported_is_one_line_before_anything_loads(tmp_path):
    """On a knowledge base that does not exist: the flags are refused before it is looked up."""
    for args, needle in ((["ask", "no-such-kb", "hi", "--sources", "21"], "--sources must be from 0 to 20 (got 21)"),
                         (["chat", "no-such-kb", "--unsupported", "nope"], "--unsupported must be flag or refuse")):
        proc = run(args, tmp_path / "home", check=False)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert needle in lines[0], lines
        assert "Traceback" not in proc.stderr + proc.stdout and proc.stdout == ""


def test_check_grounding_accepts_the_range_and_the_modes_in_any_case():
    assert [cli._check_grounding(n, "flag") for n in (0, 3, 20)] == ["flag"] * 3
    assert cli._check_grounding(3, " REFUSE ") == "refuse"
    for n, mode in ((-1, "flag"), (21, "flag"), (3, "reject"), (3, "")):
        with pytest.raises(cag.errors.CagError):
            cli._check_grounding(n, mode)


def test_cli_defaults_are_the_librarys():
    """cli.py does not import cag.kb.grounding (it would slow every command's start): its copies must agree."""
    assert cli.SOURCES == grounding.DEFAULT_SOURCES and cli.MAX_SOURCES == grounding.MAX_SOURCES
    assert cli.UNSUPPORTED_MODES == grounding.MODES


@pytest.mark.parametrize("command", ["ask", "chat"])
def test_help_names_both_flags_with_their_defaults(command):
    shown = CliRunner().invoke(cli.app, [command, "--help"], env={"COLUMNS": "200"}, color=False).output
    flat = " ".join(shown.replace("│", " ").split())
    assert "--sources N" in flat and "0 to 20" in flat and "[default: 3]" in flat, shown
    assert "--unsupported [flag|refuse]" in flat and "[default: flag]" in flat, shown


# -- rendering (no model) ------------------------------------------------------------------------------

def _answer(supported: bool, support: float, sources: list, generated: str | None = None) -> Answer:
    return Answer("q", "a", [1], 0.1, 0.2, 10, 8, 2, 1, True, "cache", "disk", sources=sources,
                  supported=supported, support=support, generated=generated)


LONG = Source("02_policies.md", "Policies › Leave", "Employees get 25 days\nof paid leave. " * 12, 0.8333,
              lines=(4, 9), heading=("Policies", "Leave"))
BARE = Source("04_history.txt", "", "1987: founded.", 0.0, lines=(1, 1))


def test_source_lines_number_locate_score_and_wrap_each_snippet():
    lines = cli_render.source_lines([LONG, BARE], width=60)
    heads = [text for text, detail in lines if not detail]
    assert heads == ["[1] 02_policies.md › Policies › Leave  (0.83)", "[2] 04_history.txt  (0.00)"]
    snippets = [text for text, detail in lines if detail]
    assert len(snippets) > 3 and all(len(t) <= 60 and t.startswith(cli_render.INDENT) for t in snippets)
    assert " ".join(t.strip() for t in snippets[:-1]) == " ".join(LONG.snippet.split())  # its line breaks folded
    assert snippets[-1] == cli_render.INDENT + "1987: founded."
    assert max(len(t) for t, _ in cli_render.source_lines([LONG], width=300)) <= cli_render.MAX_WIDTH


def test_warning_only_for_an_unsupported_answer_and_says_what_to_do():
    assert cli_render.warning(_answer(True, 0.9, [LONG]), 3) is None
    flagged = cli_render.warning(_answer(False, 0.17, [LONG]), 3)
    assert flagged == f"{cli_render.WARNING} (support 0.17): check the sources"
    assert cli_render.warning(_answer(False, 0.17, []), 0) == f"{cli_render.WARNING} (support 0.17)"
    assert "replaced" in cli_render.warning(_answer(False, 0.0, [LONG], generated="Paris."), 3)


def test_answer_row_has_plain_sources_and_no_token_ids():
    row = cli_render.answer_row(_answer(False, 0.17, [LONG, BARE], generated="x"))
    assert "token_ids" not in row and row["generated"] == "x" and row["supported"] is False
    assert row["sources"][0] == {**LONG.to_dict(), "lines": [4, 9], "heading": ["Policies", "Leave"]}
    assert json.loads(json.dumps(row))["sources"][1]["lines"] == [1, 1]
