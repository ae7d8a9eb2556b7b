"""The `cag` command as a user runs it: real subprocesses, one-line errors, no tracebacks."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cliutil import CAG, assert_one_line_error, run


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("The Heron lantern costs 148 crowns. It is blue.")
    (docs / "b.txt").write_text("Quillfeather was founded in 1987 by Odalys Renn.")
    home = tmp_path / "home"
    run(["build", docs, "--name", "kb", "--model", tiny_model_dir], home)
    return home, docs


def test_build_ask_ls_inspect_rm(setup):
    home, _ = setup
    single = run(["ask", "kb", "Who founded it?", "--max-new-tokens", "8"], home)
    assert "[cache]" in single.stderr and "8 generated" in single.stderr
    js = json.loads(run(["ask", "kb", "Who founded it?", "--json", "--max-new-tokens", "8"], home).stdout)
    for key in ("question", "answer", "ttft_s", "total_s", "prompt_tokens", "cached_tokens", "new_tokens"):
        assert key in js
    assert js["answer"] == single.stdout.strip() and js["cached_tokens"] > 0 and js["mode"] == "cache"
    assert js["new_tokens"] == 8
    assert "kb" in run(["ls"], home).stdout
    info = json.loads(run(["inspect", "kb", "--json"], home).stdout)
    assert info["integrity"] == "ok" and info["manifest"]["tokens"] == js["cached_tokens"]
    assert "integrity" in run(["inspect", "kb"], home).stdout
    run(["rm", "kb"], home)
    assert_one_line_error(run(["ask", "kb", "hi"], home, check=False), "no knowledge base named 'kb'")


def test_questions_file_cached_equals_no_cache(setup, tmp_path):
    home, _ = setup
    qfile = tmp_path / "q.jsonl"
    qs = ["Who founded it?", "How much is the Heron?", "What colour?", "When?", "Is it blue?"]
    qfile.write_text("\n".join(json.dumps({"q": q}) for q in qs) + "\n")
    cached = [json.loads(line) for line in run(["ask", "kb", "-q", qfile, "--json", "--max-new-tokens", "12"], home).stdout.splitlines()]
    ref = [json.loads(line) for line in run(["ask", "kb", "-q", qfile, "--json", "--no-cache", "--max-new-tokens", "12"], home).stdout.splitlines()]
    assert [r["question"] for r in cached] == qs
    assert [r["answer"] for r in cached] == [r["answer"] for r in ref]
    assert all(r["cached_tokens"] > 0 for r in cached) and all(r["cached_tokens"] == 0 for r in ref)
    plain = [json.loads(line) for line in run(["ask", "kb", "-q", qfile, "--json", "--no-draft", "--max-new-tokens",
                                               "12"], home).stdout.splitlines()]
    assert [r["answer"] for r in plain] == [r["answer"] for r in cached]  # drafts change when, not what
    assert all(r["drafted"] == r["accepted"] == 0 for r in plain)
    assert all(0 <= r["accepted"] <= r["drafted"] for r in cached)


def test_chat_keeps_history(setup):
    home, _ = setup
    proc = run(["chat", "kb", "--max-new-tokens", "6"], home, stdin="Who founded it?\nAnd when?\n/exit\n")
    assert proc.stdout.count("cag> ") == 2


def test_errors_are_one_line(setup, tmp_path, tiny_model_dir):
    home, docs = setup
    missing = tmp_path / "nope.md"
    assert_one_line_error(run(["build", missing, "--model", tiny_model_dir], home, check=False), str(missing))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "ok"}\nnot json\n')
    assert_one_line_error(run(["ask", "kb", "-q", bad], home, check=False), f"{bad}:2")
    assert_one_line_error(run(["ask", "kb"], home, check=False), 'missing the question: cag ask kb "QUESTION"')
    assert_one_line_error(run(["build", docs, "--model", tmp_path / "no-model"], home, check=False),
                          f"no model at {tmp_path / 'no-model'}")
    from conftest import SAMPLE_DOCS

    assert_one_line_error(run(["build", SAMPLE_DOCS, "--model", tiny_model_dir], home, check=False),
                          "tokens, but at most 512 fit")
    (docs / "b.txt").write_text("changed")
    assert_one_line_error(run(["ask", "kb", "hi", "--no-rebuild"], home, check=False), "changed")
    cache = Path(home) / "kbs" / "kb" / "cache.safetensors"
    cache.write_bytes(cache.read_bytes()[:1000])
    assert_one_line_error(run(["ask", "kb", "hi"], home, check=False), "corrupt or truncated")


def test_stale_knowledge_is_rebuilt_on_ask(setup):
    home, docs = setup
    (docs / "b.txt").write_text("Quillfeather was founded in 1990.")
    proc = run(["ask", "kb", "When?", "--max-new-tokens", "4"], home)
    assert "rebuilding" in proc.stderr


def test_help_lists_every_command():
    out = subprocess.run(CAG + ["--help"], capture_output=True, text=True).stdout
    for command in ("build", "ask", "chat", "ls", "inspect", "rm"):
        assert command in out


def test_version_native_reports_the_kernel_build_or_why_not(tmp_path):
    from conftest import require_native

    require_native()
    proc = run(["version", "--native"], tmp_path / "home")
    assert "native kernels:" in proc.stdout and "qmatmul-" in proc.stdout
    env_off = {**os.environ, "CAG_HOME": str(tmp_path / "home"), "CAG_NATIVE": "0"}
    off = subprocess.run(CAG + ["version", "--native"], capture_output=True, text=True, env=env_off, timeout=120)
    assert off.returncode == 0 and "unavailable: native kernels disabled by CAG_NATIVE=0" in off.stdout


def test_questions_file_takes_what_json_output_writes(setup, tmp_path):
    """`cag ask --json` output fed back as --questions: objects with `question` work as well as `q`."""
    home, _ = setup
    first = tmp_path / "q.jsonl"
    first.write_text('{"q": "Who founded it?"}\n{"question": "How much is the Heron?"}\n')
    out = run(["ask", "kb", "-q", first, "--json", "--max-new-tokens", "3"], home).stdout
    again = tmp_path / "again.jsonl"
    again.write_text(out)
    rows = [json.loads(line) for line in run(["ask", "kb", "-q", again, "--json", "--max-new-tokens", "3"], home).stdout.splitlines()]
    assert [r["question"] for r in rows] == ["Who founded it?", "How much is the Heron?"]


def test_bad_arguments_are_refused_before_the_model_loads(setup, tmp_path):
    home, docs = setup
    proc = run(["ask", "kb", "hi", "--max-new-tokens", "0"], home, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "--max-new-tokens" in proc.stderr
    # an empty question is refused before anything is loaded: even for a knowledge base that does not exist
    assert_one_line_error(run(["ask", "no-such-kb", "   "], home, check=False), "the question is empty")
    empty = tmp_path / "empty-q.jsonl"
    empty.write_text('{"question": "  "}\n')
    assert_one_line_error(run(["ask", "no-such-kb", "-q", empty], home, check=False), f"{empty}:1")


def test_a_question_past_the_context_window_is_an_error_not_garbage(setup):
    home, _ = setup
    proc = run(["ask", "kb", "lantern " * 1100, "--max-new-tokens", "4"], home, check=False)
    assert_one_line_error(proc, "does not fit the model's context window", "knowledge tokens", "1024 available")
    proc = run(["ask", "kb", "Who founded it?", "--max-new-tokens", "1000"], home, check=False)
    assert_one_line_error(proc, "1000 answer tokens")


def test_chat_drops_the_oldest_turns_when_the_window_runs_out(setup):
    home, _ = setup
    long_q = "Tell me everything about the lanterns and their prices " * 35  # ~350 tokens: 3 do not fit
    proc = run(["chat", "kb", "--max-new-tokens", "40"], home, stdin=f"{long_q}\n{long_q}\n{long_q}\nAnd who?\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("cag> ") == 4  # every question answered
    assert "no longer fit the context window: dropped" in proc.stderr
    proc = run(["chat", "kb"], home, stdin="lantern " * 1100 + "\nWho?\n/exit\n")
    assert "not sent:" in proc.stderr and proc.stdout.count("cag> ") == 1  # refused, the chat goes on


def test_unsupported_files_in_a_folder_are_reported(tmp_path, tiny_model_dir):
    docs = tmp_path / "mixed"
    docs.mkdir()
    (docs / "a.md").write_text("The Heron lantern costs 148 crowns.")
    (docs / "diagram.xyz").write_bytes(b"\x00\x01")
    (docs / ".hidden.bin").write_bytes(b"\x00")
    proc = run(["build", docs, "--name", "mixed", "--model", tiny_model_dir], tmp_path / "home")
    assert "skipped 1 file(s) of unsupported type: diagram.xyz" in proc.stderr


def test_a_home_that_cannot_be_written_is_a_one_line_error(tmp_path, tiny_model_dir):
    blocker = tmp_path / "file"
    blocker.write_text("")
    docs = tmp_path / "d"
    docs.mkdir()
    (docs / "a.md").write_text("text")
    proc = run(["build", docs, "--model", tiny_model_dir], blocker / "home", check=False)
    assert_one_line_error(proc, "cannot store knowledge bases", "is not a folder")


def test_rm_of_a_sharded_knowledge_base_removes_its_shards(tmp_path, tiny_model_dir):
    from conftest import SAMPLE_DOCS

    home = tmp_path / "home"
    run(["build", SAMPLE_DOCS, "--name", "big", "--shard", "--reserve", "256", "--model", tiny_model_dir], home)
    listed = run(["ls", "--json"], home).stdout.splitlines()
    assert [json.loads(r)["name"] for r in listed] == ["big"]  # shards only with --all
    assert len(run(["ls", "--json", "--all"], home).stdout.splitlines()) > 2
    assert_one_line_error(run(["rm", "big.shard0"], home, check=False), "one shard of the knowledge base 'big'")
    run(["rm", "big"], home)
    assert run(["ls", "--json", "--all"], home).stdout.strip() == ""


def test_help_shows_no_type_after_flags_and_needs_no_torch():
    for args in (["--help"], ["ask", "--help"], ["chat", "--help"], ["ls", "--help"], ["serve", "--help"]):
        proc = subprocess.run(CAG + args, capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"})
        assert proc.returncode == 0 and "<bool>" not in proc.stdout and " range>" not in proc.stdout, proc.stdout
    # `cag --help` and `cag version` start fast because nothing imports torch or transformers on the way
    code = ("import sys; from cag import cli; cli.app(['version'], standalone_mode=False); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr


def test_progress_shows_as_plain_lines_when_stderr_is_not_a_terminal(tmp_path, tiny_model_dir):
    from conftest import SAMPLE_DOCS

    proc = run(["build", SAMPLE_DOCS, "--name", "big", "--shard", "--reserve", "256", "--model", tiny_model_dir],
               tmp_path / "home")
    lines = proc.stderr.splitlines()
    assert any(line.startswith("loading model ") and ": done in " in line for line in lines), proc.stderr
    percents = [line for line in lines if line.startswith("prefill: ")]
    assert sum("prefill: 100% (" in line for line in percents) >= 2, proc.stderr  # every shard's prefill reports
    assert len(percents) > sum("100%" in line for line in percents)  # and before it ends, not only at the end
    # each prefill says when it starts, before its first piece, and its 100% line follows
    starts = [i for i, line in enumerate(percents) if re.fullmatch(
        r"prefill: \d+ tokens to compute \(reading and tokenizing took [\d.]+ s\)", line)]
    ends = [i for i, line in enumerate(percents) if line.startswith("prefill: 100% (")]
    assert len(starts) == len(ends) and all(s < e for s, e in zip(starts, ends)) and starts[0] == 0, proc.stderr
    assert "\r" not in proc.stderr


def test_ls_fits_80_columns_and_inspect_uses_iso_times(setup):
    import re

    home, _ = setup
    proc = subprocess.run(CAG + ["ls"], capture_output=True, text=True,
                          env={**os.environ, "CAG_HOME": str(home), "COLUMNS": "80"})
    lines = proc.stdout.splitlines()
    assert lines and max(len(line) for line in lines) <= 80, proc.stdout
    assert any(line.split()[0] == "kb" for line in lines if line.strip())
    info = json.loads(run(["inspect", "kb", "--json"], home).stdout)
    iso = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
    assert re.fullmatch(iso, info["built_at"]) and re.fullmatch(iso, info["manifest"]["created"])


def _read_until(fd: int, done, seconds: float, what: str, got: bytes = b"") -> bytes:
    """Bytes from `fd`, one at a time, until done(bytes so far) (or EOF with done=None); what follows is left
    in the pipe. Fails naming `what` after `seconds`."""
    import select
    import time

    deadline = time.monotonic() + seconds
    while done is None or not done(got):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"{what}: not within {seconds} s; stdout so far: {got!r}")
        chunk = os.read(fd, 1 if done else 65536)
        if not chunk:
            if done is None:
                return got
            raise AssertionError(f"{what}: the chat ended first; stdout: {got!r}")
        got += chunk
    return got


def test_chat_ctrl_c_stops_the_answer_and_keeps_the_chat(tmp_path, endless_model_dir):
    """Ctrl-C while an answer is being written stops that answer (what was shown stays, as the turn's answer)
    and the chat goes on: the next question is answered in full.

    The interrupt provably lands mid-answer, whatever the machine's speed: the model never ends an answer
    early (endless_model_dir), the answer is longer than the pipe the chat writes to can hold, and this test
    stops reading once the answer's first byte came. So the chat cannot have finished the answer when
    SIGINT arrives: at the latest it waits, mid-answer, for the pipe to drain."""
    import fcntl
    import signal

    from conftest import ENDLESS_MIN_BYTES

    if not hasattr(fcntl, "F_SETPIPE_SZ"):
        pytest.skip("needs Linux pipes (F_SETPIPE_SZ) to hold the answer mid-stream")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("The Heron lantern costs 148 crowns.")
    home = tmp_path / "home"
    run(["build", docs, "--name", "kb", "--model", endless_model_dir], home)
    read_end, write_end = os.pipe()
    capacity = fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)  # the least the kernel allows: one page
    n = capacity * 3 // 2 // ENDLESS_MIN_BYTES  # an answer of n tokens is at least 1.5 pipes of text
    if n > 800:  # 64 KiB pages: such an answer would not fit the tiny model's context window
        pytest.skip(f"a pipe holds {capacity} bytes here: too many for an answer to outgrow")
    env = {**os.environ, "CAG_HOME": str(home)}
    env.pop("CAG_SIGNING_KEY", None)
    # Ctrl-C must reach it as at a terminal: a test run started in the background (`cmd &` in a script)
    # would otherwise pass on SIGINT ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen(CAG + ["chat", "kb", "--max-new-tokens", str(n)], stdin=subprocess.PIPE,
                            stdout=write_end, stderr=subprocess.PIPE, env=env, bufsize=0,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(write_end)
    try:
        proc.stdin.write(b"Tell me about the Heron.\n")
        shown = _read_until(read_end, lambda got: re.fullmatch(rb"you> cag> .+", got, re.S), 300,
                            "the answer's first byte")
        proc.send_signal(signal.SIGINT)  # the answer has begun and cannot have ended: see the docstring
        proc.stdin.write(b"/reset\nWho?\n/exit\n")
        proc.stdin.close()
        stdout = _read_until(read_end, None, 300, "the rest of the chat", shown).decode()
        code = proc.wait(timeout=60)
    finally:
        os.close(read_end)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read().decode()
    assert code == 0 and "Traceback" not in stderr, stderr
    m = re.fullmatch(r"you> cag> (.*)\n\nyou> you> cag> (.*)\nyou> ", stdout, re.S)
    # the interrupted answer, then a new prompt; /reset; the next answer; the prompt /exit left
    assert m, f"{stdout[:400]!r} … {stdout[-400:]!r}"
    first, second = m[1], m[2]
    assert "(stopped)" in stderr and "history cleared (1 turn forgotten)" in stderr, stderr  # the turn was kept
    assert 0 < len(first.encode()) < n * ENDLESS_MIN_BYTES  # stopped part way: shown, and short of the end
    assert len(second.encode()) >= n * ENDLESS_MIN_BYTES  # the next question got its whole answer
    assert set(first.split()) <= set(second.split())  # the same model's words, cut short


def test_ls_does_not_call_an_unread_cache_ok_and_verify_reads_it(setup):
    home, _ = setup
    row = json.loads(run(["ls", "--json"], home).stdout)
    assert row["status"] == "cached (not verified)" and row["verified"] is None  # nothing was read: no "ok"
    assert json.loads(run(["ls", "--json", "--verify"], home).stdout)["status"] == "ok"
    cache = Path(home) / "kbs" / "kb" / "cache.safetensors"
    data = bytearray(cache.read_bytes())
    data[-3] ^= 0xFF  # one byte of the tensors: the manifest still reads, the checksum fails
    cache.write_bytes(bytes(data))
    row = json.loads(run(["ls", "--json"], home).stdout)
    assert row["status"] == "cached (not verified)" and row["verified"] is None  # still not read, still not "ok"
    plain = run(["ls"], home)
    assert [line.split()[-1] for line in plain.stdout.splitlines() if line.startswith("kb ")] == ["cached"]
    assert "`cag ls --verify` checks" in plain.stderr
    checked = json.loads(run(["ls", "--json", "--verify"], home).stdout)
    assert checked["status"].startswith("broken: ") and "checksum" in checked["status"] and checked["verified"] is False
    assert checked["tiers"] == ["disk"] and checked["bytes"] == row["bytes"]  # still there, and still listed as such
    table = run(["ls", "--verify"], home).stdout
    assert [line.split()[-1] for line in table.splitlines() if line.startswith("kb ")] == ["broken"]


def test_ls_fits_80_columns_with_local_model_paths_and_tenants(tmp_path, tiny_model_dir, sharp_model_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("The Heron lantern costs 148 crowns.")
    home = tmp_path / "home"
    run(["build", docs, "--name", "kb", "--model", tiny_model_dir], home)
    run(["build", docs, "--name", "public__benefits", "--model", tiny_model_dir], home)  # a tenant's, as older
    run(["build", docs, "--name", "lantern-handbook-2024", "--model", sharp_model_dir], home)  # versions named them
    proc = subprocess.run(CAG + ["ls"], capture_output=True, text=True,
                          env={**os.environ, "CAG_HOME": str(home), "COLUMNS": "80"})
    lines = proc.stdout.splitlines()
    assert lines and max(len(line) for line in lines) <= 80 and "…" not in proc.stdout, proc.stdout
    headers = [line.split() for line in lines if line.startswith("name ")]
    assert headers == [["name", "tenant", "tokens", "docs", "size", "tiers", "age", "hits", "status"]] * 2, proc.stdout
    for name, tenant in (("kb", "-"), ("benefits", "public"), ("lantern-handbook-2024", "-")):
        row = next(line.split() for line in lines if line.split()[:1] == [name])
        assert row[1] == tenant and row[5] == "MB" and row[-1] == "cached", proc.stdout  # one line each
    assert f"model: {tiny_model_dir.name}" in lines and f"model: {sharp_model_dir.name}" in lines
    assert str(tiny_model_dir) not in proc.stdout


def test_version_flag():
    from cag import __version__

    proc = subprocess.run(CAG + ["--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == __version__, proc.stderr


def test_no_rebuild_is_refused_before_the_model_loads(setup):
    home, docs = setup
    (docs / "b.txt").write_text("Quillfeather was founded in 1990.")
    proc = run(["ask", "kb", "Who?", "--no-rebuild"], home, check=False)
    assert_one_line_error(proc, "changed since its cache was built", "drop --no-rebuild")
    assert "loading model" not in proc.stderr
    run(["invalidate", "kb"], home)
    proc = run(["ask", "kb", "Who?", "--no-rebuild"], home, check=False)
    assert_one_line_error(proc, "no servable cache of 'kb'")
    assert "loading model" not in proc.stderr
    assert "rebuilding" in run(["ask", "kb", "Who?", "--max-new-tokens", "2"], home).stderr  # without the flag


def test_ask_without_a_question_says_what_is_missing(setup):
    home, _ = setup
    assert_one_line_error(run(["ask", "kb"], home, check=False), "missing the question", "--questions FILE.jsonl")
    assert_one_line_error(run(["ask", "kb", "Who?", "-q", "x.jsonl"], home, check=False), "not both")


def test_exit_codes_are_the_ones_the_readme_gives(monkeypatch, capsys):
    """1: an error of the user's to fix; 2: a usage mistake or an internal error (a bug); as README.md says."""
    from cag import cli

    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    assert "exit code 1" in readme and "exit code 2 for a usage mistake" in readme and "or an internal error" in readme
    assert subprocess.run(CAG + ["ask"], capture_output=True, text=True).returncode == 2  # missing NAME

    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug")

    monkeypatch.delenv("CAG_DEBUG", raising=False)
    monkeypatch.setattr(cli, "app", broken)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2 and "internal error: RuntimeError: a bug" in capsys.readouterr().err


class Terminal:
    """`cag ARGS` on a pseudo-terminal (its stdin, stdout and stderr), as a person at a terminal runs it."""

    def __init__(self, args, home):
        import fcntl
        import pty
        import struct
        import termios

        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        env = {**os.environ, "CAG_HOME": str(home), "TERM": "xterm"}
        env.pop("COLUMNS", None)
        self.proc = subprocess.Popen(CAG + [str(a) for a in args], stdin=slave, stdout=slave, stderr=slave, env=env)
        os.close(slave)
        self.seen, self.pos = "", 0

    def until(self, text: str, timeout: float = 180) -> str:
        """What the terminal showed from the last match up to and including the next `text`."""
        import time

        deadline = time.time() + timeout
        while text not in self.seen[self.pos:]:
            if time.time() > deadline or not self._read(min(1.0, deadline - time.time())):
                raise AssertionError(f"{text!r} never came; the terminal shows:\n{self.seen}")
        end = self.seen.index(text, self.pos) + len(text)
        shown, self.pos = self.seen[self.pos:end], end
        return shown

    def _read(self, wait: float) -> bool:
        import select

        if select.select([self.master], [], [], max(wait, 0))[0]:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # the program ended and closed the terminal
                return self.proc.poll() is None
            self.seen += data.decode("utf-8", "replace")
        return self.proc.poll() is None or bool(select.select([self.master], [], [], 0)[0])

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def exit(self) -> int:
        """Leave the chat; its exit code."""
        self.type("/exit\r")
        return self.close()

    def close(self) -> int:
        try:
            code = self.proc.wait(timeout=60)
            while self._read(0.1):
                pass
            return code
        finally:
            os.close(self.master)


UP, LEFT = "\x1b[A", "\x1b[D"


def test_chat_on_a_terminal_edits_lines_recalls_questions_and_lists_commands(setup):
    home, _ = setup
    term = Terminal(["chat", "kb", "--max-new-tokens", "3"], home)
    term.until("you> ")
    term.type("Who founded it?\r")
    term.until("cag> ")
    term.until("you> ")
    term.type(f"/hlp{LEFT}{LEFT}e\r")  # the arrows move in the line: this is /help
    shown = term.until("you> ")
    assert "/reset" in shown and "/exit" in shown and "cag> " not in shown, shown
    term.type(f"{UP}{UP}\r")  # two lines back: the question again
    assert "Who founded it?" in term.until("cag> ")
    term.until("you> ")
    assert term.exit() == 0
    assert "^[[" not in term.seen and "unknown command" not in term.seen, term.seen
    kept = Path(home) / "chat_history"
    assert "Who founded it?" in kept.read_text() and kept.stat().st_mode & 0o777 == 0o600
    again = Terminal(["chat", "kb", "--max-new-tokens", "3"], home)  # a later chat recalls the earlier one's lines
    again.until("you> ")
    again.type(UP)
    assert "/exit" in again.until("/exit")
    again.type("\x15/exit\r")  # Ctrl-U clears the recalled line
    assert again.close() == 0 and "cag> " not in again.seen


def test_chat_discards_what_is_typed_while_the_model_loads(setup):
    """Keys typed while the chat starts are not kept for its first prompt. They provably arrive before it:
    the knowledge changed, so starting includes a rebuild, and the rebuild's save waits for the knowledge
    base's writer lock (an flock on its folder), which this test holds until it has typed."""
    import fcntl

    home, docs = setup
    (docs / "b.txt").write_text("Quillfeather was founded in 1990.")  # stale: the chat rebuilds as it starts
    lock = os.open(Path(home) / "kbs" / "kb", os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        term = Terminal(["chat", "kb", "--max-new-tokens", "3"], home)
        term.until("loading model")
        term.type("typed too early\r")
    finally:
        os.close(lock)  # the rebuild may save now; only then does the first prompt come
    term.until("you> ")
    assert term.exit() == 0
    assert "typed too early" not in term.seen and "cag> " not in term.seen, term.seen
    assert "rebuilding" in term.seen, term.seen  # it did start with the rebuild that waited for the lock
