"""The `cag` command. Thin on purpose: parse flags, call the API, print. Errors become one line + exit 1."""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .cli_options import (MAX_SOURCES, MODEL_HELP, SOURCES, UNSUPPORTED_MODES, AsJson, Context,
                          Device, Draft, Dtype, KvType, MaxNewTokens, Model, Name, Redis, Seed, Sources, Stop,
                          System, Temperature, Tenant, Threads, TopP, Unsupported)
from .cli_render import answer_row, show_grounding
from .errors import CagError, ContextLengthError
from .stoptext import StopText

if TYPE_CHECKING:
    from .engines.options import EngineOptions
    from .kb.prompt import Turn

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Cache-augmented generation: prefill a knowledge base once, answer every question from its KV cache.",
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

CHAT_HISTORY = "chat_history"  # in CAG_HOME: questions typed in `cag chat` on a terminal, for the up arrow
CHAT_HELP = ("commands: /help lists them; /reset clears the history; /exit or /quit (or Ctrl-D) quits. Ctrl-C stops "
             "the answer being written. On a terminal the arrows edit the line and recall earlier questions.")


def _print_version(value: bool) -> None:
    if value:
        out.print(__version__)
        raise typer.Exit()


@app.callback()
def _main(_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                         help="Print cag's version and exit.")) -> None:
    # the options of `cag` itself, before any command (its help text is the Typer's above)
    pass


def _log(msg: str) -> None:
    err.print(msg, style="dim", markup=False)


def _quiet_transformers() -> None:
    """Through the environment, read when transformers is first imported: importing it here would cost
    every command (`cag --help` included) a second or more."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _hide_flag_types() -> None:
    """typer prints `<bool>` after flags such as --json, which take no value: show nothing there; and
    `<int range>` where `<int>` says it (the range is printed beside it)."""
    try:
        from typer.core import TyperOption
    except ImportError:  # older typer: no type column to fix
        return
    show = getattr(TyperOption, "display_type_rich", None)
    if show is None or getattr(show, "_cag", False):
        return

    def display_type_rich(self, ctx):
        if getattr(self, "is_flag", False):
            return None
        shown = show(self, ctx)
        return shown.replace(" range>", ">") if isinstance(shown, str) else shown

    display_type_rich._cag = True
    TyperOption.display_type_rich = display_type_rich


_hide_flag_types()


@contextmanager
def _status(what: str) -> Iterator[None]:
    """A spinner while `what` runs (on a terminal); elsewhere a line when it starts and when it is done, so
    logs and CI output show where the time goes."""
    start = time.perf_counter()
    try:
        if err.is_terminal:
            with err.status(f"[dim]{what}…", spinner="dots"):
                yield
        else:
            err.print(f"{what}…", style="dim", markup=False)
            yield
            err.print(f"{what}: done in {time.perf_counter() - start:.1f} s", style="dim", markup=False)
    finally:
        _Bar.reported += time.perf_counter() - start


class _Bar:
    """Prefill progress from the API's (done, total) callback, which comes once as a prefill starts (done:
    the positions reused from an earlier cache) and after each piece. On a terminal, a bar; elsewhere plain
    lines (a pipe or a log file still shows that a long build is moving): one as the prefill starts, with the
    tokens to compute and how long reading and tokenizing took before it (loading the model has its own
    line), then one per 10% of those tokens with the time since the prefill started."""

    reported = 0.0  # seconds that _status lines have accounted for (loading the model): not reading time

    def __init__(self, what: str = "prefill"):
        self.what, self.progress, self.task = what, None, None
        self.total = self.done = self.reused = 0
        self.step, self.start = -1, 0.0
        self.idle, self.seen = time.perf_counter(), _Bar.reported  # since when, and what _status said since

    def __enter__(self):
        return self

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.done >= self.total or total != self.total or done < self.done:  # a prefill starts (a shard's too)
            self._begin(done, total, now)
        else:
            self.done = done
            self._report(now)
        self.idle, self.seen = now, _Bar.reported

    def _begin(self, reused: int, total: int, now: float) -> None:
        before = max(now - self.idle - (_Bar.reported - self.seen), 0.0)
        self.total, self.done, self.reused, self.step, self.start = total, reused, reused, 0, now
        if self.progress is None and err.is_terminal:  # started here, not on entry: the model loads first,
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # under its own spinner

            self.progress = Progress(TextColumn(f"[dim]{self.what}"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total} tokens"), TimeElapsedColumn(),
                                     console=err, transient=True)
            self.progress.__enter__()
        if self.progress is not None:
            self.task = self.progress.add_task(self.what, total=total - reused)
            return
        kept = f", {reused} reused from the earlier cache" if reused else ""
        err.print(f"{self.what}: {total - reused} tokens to compute{kept} (reading and tokenizing took "
                  f"{before:.1f} s)", style="dim", markup=False)

    def _report(self, now: float) -> None:
        computed, todo = self.done - self.reused, self.total - self.reused
        if self.progress is not None:
            self.progress.update(self.task, completed=computed)
            return
        step = 10 * computed // max(todo, 1)
        if step > self.step:
            self.step = step
            err.print(f"{self.what}: {10 * step}% ({computed}/{todo} tokens, {now - self.start:.1f} s)", style="dim",
                      markup=False)

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc) if self.progress is not None else False


def _engine(**fields) -> "EngineOptions":
    """The engine options given on the command line, refused at once where one does not apply to the model."""
    from .engines.options import EngineOptions

    return EngineOptions.of(**fields).checked()


def _load_model(options: "EngineOptions"):
    from . import engines

    with _status(f"loading model {options.model or engines.DEFAULT_MODEL}"):
        return engines.load(options, log=_log)


@app.command()
def build(
    paths: List[Path] = typer.Argument(..., help="Files and folders (.txt .md .html .pdf …) to build from."),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="Knowledge base name (default: first path's name)."),
    model: Model = None,
    device: Device = None,
    dtype: Dtype = None,
    reserve: int = typer.Option(512, help="Context tokens kept free for question and answer."),
    chunk_size: int = typer.Option(512, help="Prefill chunk size in tokens (bounds memory)."),
    ttl: Optional[float] = typer.Option(None, "--ttl", help="Seconds the cache may be served; then it is rebuilt."),
    kb_version: Optional[int] = typer.Option(None, "--kb-version", help="Version of this build (see `cag publish`)."),
    full: bool = typer.Option(False, "--full", help="Prefill everything, even what an earlier cache still covers."),
    shard: bool = typer.Option(False, "--shard", help="Split knowledge too large for one context into shards (BM25 routes questions)."),
    redis: Redis = None,
    kv_int8: bool = typer.Option(False, "--kv-int8", help="Store the KV cache as int8 (half of bf16; lossy, answers may change)."),
    kv_type: KvType = None,
    context: Context = None,
    threads: Threads = None,
) -> None:
    """Prefill a knowledge base once (only what changed, after the first time) and store its KV cache."""
    from . import api

    _use_redis(redis)
    engine = _engine(model=model, device=device, dtype=dtype, kv_type=kv_type, context=context, threads=threads)
    options = api.BuildOptions(engine, reserve=reserve, chunk_size=chunk_size, ttl_s=ttl, version=kb_version,
                               incremental_update=not full, shard=shard, kv_quant="int8" if kv_int8 else None)
    with _Bar() as bar:
        kb = api.build(paths, name, options=options, log=_log, progress=bar, lm=lambda: _load_model(engine))
    s = kb.build_stats
    out.print(f"built [bold]{kb.name}[/bold]: {len(kb.docs)} documents, {s.tokens} tokens in {s.seconds:.2f} s "
              f"({s.tokens_per_s:.0f} tokens/s), cache {s.file_bytes / 1e6:.1f} MB; {s.how}")


def _kb_key(name: str, tenant: Optional[str]) -> str:
    """Where the knowledge base `name` (of `tenant`) is stored: see cag.registry.resolve."""
    from . import registry

    return registry.resolve(name, tenant, log=_log)


def _load_kb(name: str, engine: "EngineOptions", rebuild: bool = True, tenant: Optional[str] = None):
    """A knowledge base with its model loaded under a status line (the slow part of starting up), `engine`'s
    options set over the ones it was built with. Without `rebuild`, a cache that would have to be rebuilt
    is refused first, before the model loads."""
    from . import api, engines

    name = _kb_key(name, tenant)
    if not rebuild:
        api.check_servable(name)
    meta = api.read_meta(name)
    with _status(f"loading model {meta.get('model') or engines.DEFAULT_MODEL}"):
        lm = api.load_engine(meta, engine, log=_log)
    with _Bar() as bar:
        return api.load(name, rebuild=rebuild, lm=lm, log=_log, progress=bar)


def _given(device: Optional[str], dtype: Optional[str], threads: Optional[int]) -> "EngineOptions":
    """What `ask` and `chat` may set over a knowledge base's own engine options (its model is its own)."""
    from .engines.options import EngineOptions

    return EngineOptions(device=device, dtype=dtype, threads=threads)


def _use_redis(url: Optional[str]) -> None:
    if url:
        os.environ["CAG_REDIS_URL"] = url


@app.command()
def ask(
    name: Name,
    question: Optional[str] = typer.Argument(None, help="The question (or use --questions)."),
    questions: Optional[Path] = typer.Option(None, "--questions", "-q",
                                             help='JSONL file, one {"q": "..."} (or {"question": "..."}) per line.'),
    no_cache: bool = typer.Option(False, "--no-cache", help="Reference mode: run the full prompt, no cached prefix."),
    as_json: AsJson = False,
    max_new_tokens: MaxNewTokens = 256,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Seed = None,
    stop: Stop = None,
    no_rebuild: bool = typer.Option(False, "--no-rebuild", help="Fail (before the model loads) instead of rebuilding "
                                                                "when knowledge files changed or the cache is gone."),
    system: System = None,
    sources: Sources = SOURCES,
    unsupported: Unsupported = "flag",
    tenant: Tenant = None,
    device: Device = None,
    dtype: Dtype = None,
    redis: Redis = None,
    threads: Threads = None,
    draft: Draft = True,
) -> None:
    """Answer questions from a knowledge base's cache (streams the answer).

    The answer goes to stdout; its sources, a warning when they do not support it, and timings go to stderr,
    so a pipe or a file gets the answer alone. --json writes everything, sources and support included.
    """
    _use_redis(redis)
    items = _questions(name, question, questions)
    options = _answer_options(max_new_tokens, temperature, top_p, seed, stop, system, sources, unsupported, draft)
    kb = _load_kb(name, _given(device, dtype, threads), rebuild=not no_rebuild, tenant=tenant)
    options["use_cache"] = not no_cache
    for q in items:
        if as_json:
            print(json.dumps(answer_row(kb.ask(q, **options)), ensure_ascii=False), flush=True)
            continue
        if len(items) > 1:
            out.print(f"[bold]Q: {q}[/bold]")
        a = kb.ask(q, on_text=_write_out, **options)
        _end_answer(a, sources)
        _log(f"[{a.mode}] ttft {a.ttft_s * 1000:.0f} ms, total {a.total_s:.2f} s, {a.cached_tokens} cached + "
             f"{a.question_tokens} computed prompt tokens, {a.new_tokens} generated{_drafted(a)}, "
             f"support {a.support:.2f}")


def _answer_options(max_new_tokens: int, temperature: float, top_p: float, seed: Optional[int],
                    stop: Optional[List[str]], system: Optional[str], sources: int, unsupported: str,
                    draft: bool) -> dict:
    """`kb.ask`'s options from `ask`'s and `chat`'s flags, each checked before anything loads (a bad stop
    string, system message, sources count or sampling value is one line, not a model load then an error)."""
    from .sampling import Sampling

    StopText(stop or ())
    _check_system(system)
    unsupported = _check_grounding(sources, unsupported)
    sampling = Sampling(temperature=temperature, top_p=top_p, seed=seed)
    return dict(max_new_tokens=max_new_tokens, sampling=sampling, stop=stop or (), system=system, sources=sources,
                unsupported=unsupported, draft=None if draft else 0)


def _drafted(answer) -> str:
    return f" ({answer.accepted} of {answer.drafted} drafted tokens taken)" if answer.drafted else ""


def _write_out(text: str) -> None:
    """Stream a piece of an answer to stdout as it comes."""
    out.file.write(text)
    out.file.flush()


def _end_answer(answer, sources: int) -> None:
    """Finish a streamed answer's line, then show its sources and support on stderr. stdout is flushed
    first so that, on a terminal, they come under the answer and not inside it."""
    out.file.write("\n")
    out.file.flush()
    show_grounding(err, answer, sources)


def _check_grounding(sources: int, unsupported: str) -> str:
    """Refuse --sources and --unsupported values no answer can be given with, in one line before the model
    loads (as cag.kb.grounding.check_options would, named by their flags); the mode, lower-cased."""
    mode = unsupported.strip().lower()
    if not 0 <= sources <= MAX_SOURCES:
        raise CagError(f"--sources must be from 0 to {MAX_SOURCES} (got {sources})")
    if mode not in UNSUPPORTED_MODES:
        raise CagError(f"--unsupported must be {' or '.join(UNSUPPORTED_MODES)} (got {unsupported!r})")
    return mode


def _check_system(system: Optional[str]) -> None:
    if system is not None and not system.strip():
        raise CagError("--system is empty: give the system message's text, or leave --system out")


def _questions(name: str, question: Optional[str], file: Optional[Path]) -> list[str]:
    if question is None and file is None:
        raise CagError(f'missing the question: cag ask {name} "QUESTION" (or --questions FILE.jsonl, one '
                       '{"q": "..."} per line)')
    if question is not None and file is not None:
        raise CagError("give a question or --questions FILE.jsonl, not both")
    if file is None:
        if not question.strip():
            raise CagError("the question is empty")
        return [question]
    if not file.is_file():
        raise CagError(f"questions file not found: {file}")
    items = []
    for no, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        q = next((row[k] for k in ("q", "question") if k in row), None) if isinstance(row, dict) else None
        if not isinstance(q, str) or not q.strip():
            raise CagError(f'{file}:{no}: expected a JSON object like {{"q": "question"}} or {{"question": "..."}} '
                           "with a non-empty question")
        items.append(q)
    if not items:
        raise CagError(f"{file} holds no questions")
    return items


@app.command()
def chat(
    name: Name,
    max_new_tokens: MaxNewTokens = 256,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Seed = None,
    stop: Stop = None,
    system: System = None,
    sources: Sources = SOURCES,
    unsupported: Unsupported = "flag",
    tenant: Tenant = None,
    device: Device = None,
    dtype: Dtype = None,
    threads: Threads = None,
    draft: Draft = True,
) -> None:
    """Interactive chat; earlier turns are kept (after the cached knowledge) as long as they fit the context.

    Ctrl-C stops the answer being written and keeps the chat; /help lists the commands; /reset clears the
    history; /exit or Ctrl-D quits. On a terminal the arrows edit the line and recall earlier questions (kept
    in CAG_HOME/chat_history).
    """
    from .kb.prompt import Turn

    options = _answer_options(max_new_tokens, temperature, top_p, seed, stop, system, sources, unsupported, draft)
    with _typeahead_discarded():
        kb = _load_kb(name, _given(device, dtype, threads), tenant=tenant)
    history: list[Turn] = []
    _log(f"chatting with {name} ({kb.tokens} cached tokens); /help lists the commands, Ctrl-C stops an answer, "
         "/exit quits")
    with _line_editing():
        while True:
            try:
                q = input("you> ").strip()
            except EOFError:
                break
            except KeyboardInterrupt:
                out.file.write("\n")
                _log("(/exit or Ctrl-D quits)")
                continue
            if q in ("/exit", "/quit"):
                break
            if not q or _chat_command(q, history):
                continue
            try:
                kept = kb.trim_history(q, history, max_new_tokens, system=system)
            except ContextLengthError as e:
                _log(f"not sent: {e}")
                continue
            if len(kept) < len(history):
                _log(f"(the {len(history) - len(kept)} oldest turn(s) no longer fit the context window: dropped)")
                history[:] = kept
            history.append(_chat_answer(kb, q, history, options))


def _chat_answer(kb, question: str, history: list[Turn], options: dict) -> Turn:
    """Stream one chat answer after `cag> `, then its sources and support; the turn to keep in the history.
    Ctrl-C stops it: the turn keeps what was shown of its answer (it has no sources: it was never judged)."""
    from .kb.prompt import Turn

    out.file.write("cag> ")
    pieces: list[str] = []

    def show(text: str) -> None:
        pieces.append(text)
        _write_out(text)

    try:
        a = kb.ask(question, history=history, on_text=show, **options)
    except KeyboardInterrupt:
        out.file.write("\n")
        _log("(stopped)")
        out.file.write("\n")
        return Turn(question, "".join(pieces).strip())
    _end_answer(a, options["sources"])
    return Turn(question, a.answer)


def _chat_command(line: str, history: list) -> bool:
    """Carry out a chat command (/help, /reset; a lone unknown /word is refused, not sent to the model);
    False for a question."""
    if line == "/help":
        _log(CHAT_HELP)
    elif line == "/reset":
        _log(f"history cleared ({len(history)} turn{'s' if len(history) != 1 else ''} forgotten)")
        history.clear()
    elif line.startswith("/") and len(line.split()) == 1:
        _log(f"unknown command {line}: /help lists the commands")
    else:
        return False
    return True


@contextmanager
def _typeahead_discarded() -> Iterator[None]:
    """On a terminal, keys pressed while the model loads are neither echoed (they would land on the spinner's
    line) nor kept for the first prompt: it starts empty. Elsewhere (a pipe, a file) input is left alone, since
    there what comes first is meant to be read."""
    try:
        import termios

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    except (ImportError, OSError, ValueError):  # no termios (Windows), or no real stdin
        saved = None
    if saved is None:
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # the local modes
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcflush(fd, termios.TCIFLUSH)
        termios.tcsetattr(fd, termios.TCSANOW, saved)


@contextmanager
def _line_editing() -> Iterator[None]:
    """On a terminal, input() edits the line and the up arrow recalls questions, this chat's and earlier
    ones' (Python's readline: GNU readline or libedit), kept in CAG_HOME/chat_history, readable by its owner
    only. Not imported elsewhere: on a pipe it has nothing to do."""
    readline = None
    if sys.stdin.isatty():
        try:
            import readline
        except ImportError:  # a Python built without it: plain input() still works
            readline = None
    if readline is None:
        yield
        return
    from . import paths

    path = paths.home() / CHAT_HISTORY
    readline.set_history_length(1000)
    try:
        readline.read_history_file(str(path))
    except OSError:
        pass  # none yet, or unreadable: this chat starts one
    try:
        yield
    finally:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # private from the start: questions can be
            readline.write_history_file(str(path))  # confidential
        except OSError:
            pass  # a read-only home: this chat's questions are not kept


@app.command("ls")
def list_(
    as_json: bool = typer.Option(False, "--json", help="One JSON object per knowledge base."),
    show_all: bool = typer.Option(False, "--all", "-a", help="Also list the shards of sharded knowledge bases."),
    verify: bool = typer.Option(False, "--verify", help="Read every local cache file and check it as a load does "
                                                        "(checksum, signature, the model's fingerprint): slow for "
                                                        "large caches."),
    redis: Redis = None,
) -> None:
    """List knowledge bases: tenant, tokens, documents, size, where their caches live (tiers), age, hits, status."""
    from . import api, paths

    _use_redis(redis)
    rows = [r for r in api.list_kbs(verify=verify) if show_all or not r.get("parent")]
    if as_json:
        for r in rows:
            print(json.dumps(r), flush=True)
        return
    if not rows:
        err.print(f"no knowledge bases in {paths.kbs_dir()}")
        return
    for i, table in enumerate(_kb_tables(rows)):
        if i:
            out.print()
        out.print(table)
    if not verify and any(r["status"].startswith("cached") for r in rows):
        out.file.flush()
        _log("cached: present, not read (`cag ls --verify` checks every cache file's checksum and signature)")


def _kb_tables(rows: list[dict]) -> list[Table]:
    """One table per model (named in its title, a local path by its last part), fitting 80 columns: the
    numbers never wrap, names and statuses do; --json has everything. A tenant column when any row has one."""
    from .registry import model_label

    tenants = any(r.get("tenant") for r in rows)
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        by_model.setdefault(model_label(r.get("model")) or "-", []).append(r)
    tables = []
    for model, group in by_model.items():
        headers = ["name", *(["tenant"] if tenants else []), "tokens", "docs", "size", "tiers", "age", "hits", "status"]
        table = Table(title=f"model: {model}", title_justify="left", title_style="dim", box=None, pad_edge=False)
        for header in headers:
            wraps = header in ("name", "status")
            table.add_column(header, no_wrap=not wraps, overflow="fold" if wraps else "ellipsis",
                             min_width=len(header), justify="left" if wraps or header in ("tenant", "tiers") else "right")
        for r in group:
            size = f"{r['bytes'] / 1e6:.1f} MB" if r.get("bytes") else "-"
            table.add_row(r["name"], *([r.get("tenant") or "-"] if tenants else []), _num(r.get("tokens")),
                          _num(r.get("documents")), size, ",".join(r.get("tiers", [])) or "-", _age_text(r.get("age_s")),
                          str(r.get("hits", 0)), _short_status(r["status"]))
        tables.append(table)
    return tables


def _num(value) -> str:
    return "-" if value is None else f"{value:,}"


def _age_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _short_status(status: str) -> str:
    """The first clause: details (which shards, why broken, which model file) are in `cag ls --json` and
    `cag inspect`."""
    return status.split(":", 1)[0] if status.startswith(("broken", "model ")) else status.split(" (", 1)[0]


@app.command()
def invalidate(name: str = typer.Argument(...), tenant: Tenant = None,
               redis: Redis = None) -> None:
    """Drop a knowledge base's cache in every tier and (through Redis) every process; the next use rebuilds it."""
    from . import api

    _use_redis(redis)
    tiers = api.invalidate(_kb_key(name, tenant))
    out.print(f"invalidated {name}: dropped from {', '.join(tiers) or 'no tier (nothing was cached)'}")


@app.command()
def publish(name: str = typer.Argument(...), kb_version: int = typer.Argument(..., metavar="VERSION"),
            tenant: Tenant = None,
            redis: Redis = None) -> None:
    """Make VERSION the only servable version of a knowledge base; every replica refuses the others."""
    from . import api

    _use_redis(redis)
    api.publish(_kb_key(name, tenant), kb_version)
    out.print(f"published {name} version {kb_version}")


@app.command()
def inspect(name: str = typer.Argument(...), tenant: Tenant = None,
            as_json: bool = typer.Option(False, "--json")) -> None:
    """Show a knowledge base's settings and manifest, and verify its cache file (checksum, signature)."""
    from . import api
    from .cache import kvfile, stores
    from .registry import split

    stored = _kb_key(name, tenant)
    record = api.record(stored)
    name, owner = split(stored, record.owner if record else None)
    meta = api.read_meta(stored)
    infos = []
    for part in meta.get("shards") or [stored]:  # a sharded knowledge base: every shard's cache
        path = stores.default().local_file(part)
        manifest = kvfile.load(path).manifest  # integrity: parse, checksum, signature when a key is set
        infos.append({"name": name if part == stored else part, **({"tenant": owner} if owner else {}),
                      "file": str(path), "bytes": path.stat().st_size, "integrity": "ok",
                      **({} if part == stored else {"shard_of": name}),
                      **{k: _iso(v) if k == "built_at" else v for k, v in api.read_meta(part).items() if k != "name"},
                      "manifest": {k: v for k, v in manifest.items() if k not in ("shapes", "passages")},
                      "passages": len((manifest.get("passages") or {}).get("passages") or ()),
                      "stored": _stored_shapes(manifest["shapes"])})
    if as_json:
        print(json.dumps(infos[0] if len(infos) == 1 else {"name": name, "shards": infos}, indent=2))
        return
    for info in infos:
        table = Table(show_header=False, title=info["name"] if len(infos) > 1 else None, title_justify="left")
        for key, value in info.items():
            if key == "manifest":
                for mk, mv in value.items():
                    table.add_row(f"manifest.{mk}", json.dumps(mv) if isinstance(mv, dict) else str(mv))
            else:
                table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
        out.print(table)


def _stored_shapes(shapes: dict) -> dict:
    """What the cache file holds, per kind of tensor: one shape when every layer's is the same (a transformers
    KV cache: `k` and `v` per layer), else the list; llama.cpp's is one `state` of bytes."""
    return {name: got[0] if got and all(g == got[0] for g in got) and isinstance(got[0], list) else got
            for name, got in shapes.items()}


def _iso(epoch: float | None) -> str | None:
    """ISO 8601 in UTC, like the manifest's `created`."""
    from datetime import datetime, timezone

    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@app.command()
def rm(name: str = typer.Argument(...), tenant: Tenant = None,
       redis: Redis = None) -> None:
    """Delete a knowledge base and its cache."""
    from . import api

    _use_redis(redis)
    api.delete(_kb_key(name, tenant))
    out.print(f"deleted {name}")


@app.command("eval")
def eval_(
    datasets: List[Path] = typer.Argument(..., help="Dataset JSON files (cag format or SQuAD-style)."),
    systems: str = typer.Option("cag,in-context,bm25,dense", help="Comma-separated: cag, in-context, bm25, dense."),
    top_k: str = typer.Option("1,3,5", "--top-k", help="Comma-separated chunk counts for the RAG systems."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", help="Most tokens to generate per answer."),
    limit: Optional[int] = typer.Option(None, help="Only the first N questions of each dataset."),
    out_dir: Path = typer.Option(Path("cag-eval"), "--out", help="Folder for results.json, results.md and plots."),
    model: Model = None,
    device: Device = None,
    dtype: Dtype = None,
    kv_type: KvType = None,
    context: Context = None,
    threads: Threads = None,
) -> None:
    """Compare CAG, in-context and BM25/dense RAG on datasets: accuracy, time to first token, tokens, build cost."""
    from .eval import report, runner

    lm = _load_model(_engine(model=model, device=device, dtype=dtype, kv_type=kv_type, context=context,
                             threads=threads))
    result = runner.run(datasets, systems=_csv(systems, str), top_k=_csv(top_k, int), max_new_tokens=max_new_tokens,
                        limit=limit, out=out_dir, lm=lm, log=_log)
    out.print(report.markdown(result["summary"]), markup=False)
    _log("wrote " + ", ".join(result["files"]))


@app.command("eval-generate")
def eval_generate(
    path: Path = typer.Argument(..., help="Dataset JSON file to write."),
    tokens: int = typer.Option(3000, help="Knowledge size in tokens of the default model."),
    questions: int = typer.Option(30, help="How many questions (single-fact and two-hop)."),
    seed: int = typer.Option(0, help="Same seed, same dataset."),
) -> None:
    """Generate a synthetic dataset of fictional facts (the model cannot know them) for `cag eval`."""
    from .eval import generate

    generate.write(str(path), tokens, questions, seed)


def _csv(text: str, kind):
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CagError(f"expected a comma-separated list, got {text!r}") from None


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", envvar="CAG_HOST",
                             help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, envvar="CAG_PORT", min=1, max=65535, help="Port to listen on."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Server config file (JSON or TOML)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="CAG_API_KEY", show_default=False,
                                          help="Require 'Authorization: Bearer KEY' on every API request (one "
                                               "tenant; for several, use api_keys in the config or CAG_API_KEYS)."),
    continuous_batching: Optional[bool] = typer.Option(
        None, "--continuous-batching/--no-continuous-batching", show_default=False,
        help="Decode the answers in progress on a knowledge base together, one step for all (default on)."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", min=1, show_default=False,
                                            help="Most answers per decoding step per knowledge base (default 32)."),
    batch_window_ms: Optional[float] = typer.Option(
        None, "--batch-window-ms", min=0, show_default=False, metavar="MS",
        help="With continuous batching: an idle knowledge base waits up to MS for more answers before its first "
             "step, so answers arriving close together start together (default 0)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, show_default=False,
                                          help="Answers computed at once (overrides the config's workers, default 4; "
                                               "with continuous batching at least --max-batch)."),
    log_level: str = typer.Option("info", "--log-level", metavar="[debug|info|warning|error]",
                                  help="Least severe log lines shown (JSON access lines go to stdout at info)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", show_default=False,
                                        help=MODEL_HELP + " Loaded at start; knowledge bases built with other "
                                             "models load theirs on first use."),
    kv_type: KvType = None,
    context: Context = None,
    threads: Threads = None,
) -> None:
    """Serve the knowledge bases in CAG_HOME over OpenAI's and Ollama's HTTP APIs (model = knowledge base)."""
    import uvicorn

    from .server import configure_logging, create_app, load_config, with_flags

    log_level = log_level.lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise typer.BadParameter(f"{log_level!r} is not one of debug, info, warning, error", param_hint="'--log-level'")
    configure_logging(log_level)
    settings = with_flags(load_config(config), api_key=api_key, continuous_batching=continuous_batching,
                          max_batch=max_batch, batch_window_ms=batch_window_ms, workers=workers, model=model,
                          kv_type=kv_type, context=context, threads=threads)
    lm = _load_model(_engine(model=settings.model, device=settings.device, dtype=settings.dtype,
                             kv_type=settings.kv_type, context=settings.context, threads=settings.threads))
    if getattr(lm, "packing", None) is not None:
        _log(str(lm.packing))
    server = create_app(settings, lm)
    del lm  # the server owns the model now: unloading it under model_bytes must free it, not leave it to this frame
    uvicorn.run(server, host=host, port=port, log_level=log_level, access_log=False)


@app.command("models")
def models_(as_json: bool = typer.Option(False, "--json", help="One JSON object per model.")) -> None:
    """List models: the default one, the Ollama store's GGUFs and those knowledge bases were built with.

    For each: what `--model` takes, its size and the knowledge bases that use it. The Ollama store is
    $OLLAMA_MODELS, else ~/.ollama/models."""
    from . import catalog

    rows = catalog.models()
    if as_json:
        for r in rows:
            print(json.dumps(r), flush=True)
        return
    table = Table(box=None, pad_edge=False)
    for header in ("model", "engine", "size", "source", "knowledge bases"):  # the model and its users may wrap
        table.add_column(header, overflow="fold", no_wrap=header not in ("model", "knowledge bases"),
                         justify="right" if header == "size" else "left")
    for r in rows:
        size = f"{r['bytes'] / 1e6:.0f} MB" if r.get("bytes") else "-"
        used = ", ".join(r["knowledge_bases"]) or "-"
        table.add_row(r["model"], r["engine"], size, r["source"] + (" (missing)" if r["problem"] else ""), used)
    out.print(table)
    if not any(r["source"] == "ollama" for r in rows):
        _log(f"no Ollama models in {catalog.ollama_store()} (set OLLAMA_MODELS to the store to list)")


@app.command()
def version(
    native: bool = typer.Option(False, "--native", help="Also build/load the packed-weight CPU kernels and say how."),
) -> None:
    """Print cag's version and the llama.cpp build GGUF models run on (--native: the torch engine's kernels)."""
    out.print(__version__)
    out.print(f"llama.cpp engine: {_llamacpp_build()}", markup=False)
    if native:
        from .engines.torch import native as kernels

        found = kernels.load()
        out.print(f"native kernels: {found.describe} ({found.path})" if found else
                  f"native kernels unavailable: {kernels.why_not()} (decoding uses float32 matmuls)", markup=False)


def _llamacpp_build() -> str:
    """Which llama.cpp GGUF models would run on here, or why none would: read from the installed package's
    metadata (importing the engine would import torch, and `cag version` starts without it)."""
    from importlib import metadata

    try:
        return f"llama-cpp-python {metadata.version('llama_cpp_python')}"
    except metadata.PackageNotFoundError:
        return ('unavailable: llama-cpp-python is not installed (pip install "llama-cpp-python==0.3.36", or '
                "`bash scripts/setup-llamacpp.sh` in a cag checkout)")


_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # a full disk, a quota, a file size limit


def main() -> None:
    _quiet_transformers()
    try:
        app(standalone_mode=True)
    except CagError as e:
        err.print(f"error: {e}", markup=False, style="red")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:  # a full disk, a read-only or missing folder: the user's to fix, not a bug
        where = f" ({e.filename})" if e.filename else ""
        room = "; make room and run it again (what was stored before is unchanged)" if e.errno in _NO_ROOM else ""
        err.print(f"error: {e.strerror or e}{where}{room}", markup=False, style="red")
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - a bug, but still no traceback unless asked for
        from .settings import current

        if current().debug:
            raise
        err.print(f"internal error: {type(e).__name__}: {e} (set CAG_DEBUG=1 for the traceback)", markup=False, style="red")
        sys.exit(2)


if __name__ == "__main__":
    main()
