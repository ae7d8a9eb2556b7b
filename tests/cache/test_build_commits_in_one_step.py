"""A build commits as one step: whatever stops it (kill -9, a full disk, an error), the knowledge base keeps
answering, from the previous version or the new one, never from a mix of the two.

The disk tier stages a build's records (kb.json, knowledge.json, tenant.json), renames the new cache into
place (the commit) and only then moves the records in; a reader takes the staged records once the cache
they were staged for is the live one. These tests kill real builds at random moments, fill a real
(tmpfs) file system, and look at the knowledge base between every two steps of a save.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cag
from cag import api
from cag.cache import kvfile
from cag.cache.stores import DiskStore, TieredStore
from cag.cache.stores import disk as disk_tier
from cliutil import assert_one_line_error, run

DOCS = {"a.md": "The Heron lantern costs 148 crowns. It is blue.",
        "b.txt": "Quillfeather was founded in 1987 by Odalys Renn."}


def _docs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    return folder


def _answers(name: str, lm) -> tuple[str, str]:
    """Load `name` the way `cag ask` does, from the disk tier alone (a fresh store: nothing held in memory),
    answer one question, and say which version answered: (KV storage type of the cache, of the record)."""
    store = TieredStore([DiskStore()])
    kb = api.load(name, lm=lm, rebuild=False, store=store, log=lambda _m: None)
    kb.ask("Who founded it?", max_new_tokens=2)
    return kvfile.kv_storage(kb.manifest), store.record(name).meta.get("kv_quant") or "float32"


# -- what a reader sees at every instant of a save --------------------------------------------------------

def test_a_reader_sees_one_whole_version_between_any_two_steps_of_a_rebuild(cag_home, tiny_lm, tmp_path):
    """Between every two file-system steps of a rebuild (each rename and each removal), another reader loads
    the knowledge base and answers: always the old version or the new one, whole."""
    docs = _docs(tmp_path / "docs")
    cag.build([docs], name="kb", lm=tiny_lm, log=lambda _m: None)
    seen, busy = [], []
    real_replace, real_unlink = os.replace, os.unlink

    def look():
        if busy:  # the reader's own writes (its hit counter) are not steps of the rebuild
            return
        busy.append(1)
        try:
            seen.append(_answers("kb", tiny_lm))
        except Exception as err:  # noqa: BLE001 - what a reader would have hit at this instant
            seen.append(f"{type(err).__name__}: {err}")
        finally:
            busy.pop()

    def replace(src, dst, *a, **kw):
        look()
        real_replace(src, dst, *a, **kw)
        look()

    def unlink(path, *a, **kw):
        look()
        real_unlink(path, *a, **kw)
        look()

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(os, "replace", replace)
        patched.setattr(os, "unlink", unlink)
        cag.build([docs], name="kb", lm=tiny_lm, log=lambda _m: None, kv_quant="int8")
    assert len(seen) >= 6, seen  # the rebuild took that many steps
    assert all(s in (("float32", "float32"), ("int8", "int8")) for s in seen), seen
    assert seen[0] == ("float32", "float32") and seen[-1] == ("int8", "int8")
    assert _answers("kb", tiny_lm) == ("int8", "int8")


def test_a_rebuild_that_fails_while_writing_its_cache_leaves_the_previous_version_answering(cag_home, tiny_lm,
                                                                                          tmp_path):
    docs = _docs(tmp_path / "docs")
    cag.build([docs], name="kb", lm=tiny_lm, log=lambda _m: None)
    before = {p.name: p.read_bytes() for p in (cag_home / "kbs" / "kb").iterdir() if p.is_file()}

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a cache")
        raise OSError(28, "No space left on device", filename)

    with pytest.MonkeyPatch.context() as patched, pytest.raises(OSError, match="No space left"):
        patched.setattr(kvfile, "save_file", half_written)
        cag.build([docs], name="kb", lm=tiny_lm, log=lambda _m: None, kv_quant="int8")
    after = {p.name: p.read_bytes() for p in (cag_home / "kbs" / "kb").iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if k != "stats.json"} == {k: v for k, v in before.items() if k != "stats.json"}
    assert sorted(p.name for p in (cag_home / "kbs" / "kb").iterdir()) == sorted(before)  # nothing staged is left
    assert _answers("kb", tiny_lm) == ("float32", "float32")


def test_records_a_killed_build_staged_are_read_only_once_its_cache_landed(cag_home, tiny_lm, tmp_path):
    """A staging folder whose cache never landed (the writer died first) is ignored by readers and cleared by
    the next writer; one whose cache did land is finished by the next writer."""
    docs = _docs(tmp_path / "docs")
    cag.build([docs], name="kb", lm=tiny_lm, log=lambda _m: None)
    folder = cag_home / "kbs" / "kb"
    staged = folder / disk_tier.STAGED_DIR
    staged.mkdir()
    for name in (disk_tier.KB_FILE, disk_tier.SNAPSHOT_FILE):
        (staged / name).write_bytes((folder / name).read_bytes().replace(b"Heron", b"Egret"))
    (staged / disk_tier.COMMIT_FILE).write_text(json.dumps({"replaces": disk_tier.file_id(folder / disk_tier.CACHE_FILE)}))
    store = DiskStore()
    assert "Egret" not in json.dumps(store.snapshot("kb")) and store.record("kb") is not None
    assert _answers("kb", tiny_lm) == ("float32", "float32")
    cag.build([docs], name="kb", lm=tiny_lm, log=lambda _m: None, kv_quant="int8")
    assert not staged.exists() and _answers("kb", tiny_lm) == ("int8", "int8")
    # staged for a cache that did land (the file in place is not the one they replace): they are the current
    # records, read from the staging folder, and the next writer (here: dropping the cache) moves them in
    staged.mkdir()
    (staged / disk_tier.SNAPSHOT_FILE).write_bytes((folder / disk_tier.SNAPSHOT_FILE).read_bytes().replace(b"Heron",
                                                                                                         b"Egret"))
    (staged / disk_tier.COMMIT_FILE).write_text(json.dumps({"replaces": [0, 0]}))
    assert "Egret" in json.dumps(store.snapshot("kb")) and "kb" in store.names()
    assert store.drop("kb") and not staged.exists()
    assert b"Egret" in (folder / disk_tier.SNAPSHOT_FILE).read_bytes() and store.record("kb") is not None


# -- kill -9 at random moments -----------------------------------------------------------------------------

DRIVER = textwrap.dedent(r'''
    """Builds killed with SIGKILL at random moments; after each kill, a fresh process loads and asks.

    Forked from one warm process so that each build costs a fork, not a Python start-up: the child runs the
    `cag build` command line itself (cli.main). Torch runs on one thread, so forking is safe."""
    import json, os, random, signal, sys, time
    import torch
    torch.set_num_threads(1)
    from cag import api, cli
    from cag.cache import kvfile
    from cag.cache.stores import DiskStore, TieredStore
    from cag.engines.torch import models

    docs, model, folder, attempts, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    lm = models.load(model, device="cpu", dtype="float32")  # for the checks; loaded before any fork, never run here
    rng = random.Random(seed)

    def fork(job):
        """Run `job` in a child with no output; its JSON result comes back through a pipe."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(r)
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1), os.dup2(null, 2)
                try:
                    result, code = job(), 0
                except SystemExit as e:
                    result, code = None, e.code if isinstance(e.code, int) else 1
                except BaseException as e:
                    result = f"{type(e).__name__}: {e}"
                os.write(w, json.dumps(result).encode())
            finally:
                os._exit(code)
        os.close(w)
        return pid, r

    def build(int8):
        def job():
            sys.argv = ["cag", "build", docs, "--name", "kb", "--model", model] + (["--kv-int8"] if int8 else [])
            cli.main()
        return fork(job)

    def check():
        def job():
            kb = api.load("kb", lm=lm, rebuild=False, store=TieredStore([DiskStore()]), log=lambda m: None)
            kb.ask("Who founded it?", max_new_tokens=2)
            return {"ok": True, "kv": kvfile.kv_storage(kb.manifest)}
        pid, r = fork(job)
        os.waitpid(pid, 0)
        with os.fdopen(r) as f:
            return json.loads(f.read() or "null")

    def files():
        found = {}
        for root, _dirs, names in os.walk(folder):
            for n in names:
                if n != "stats.json":
                    try:
                        st = os.stat(os.path.join(root, n))
                        found[os.path.join(root, n)] = (st.st_ino, st.st_mtime_ns, st.st_size)
                    except OSError:
                        pass
        return found

    def run(int8, delay=None, after_change=True):
        """Start a build; kill it `delay` s after its first change on disk (or after its start)."""
        base = files()
        start = time.perf_counter()
        pid, r = build(int8)
        changed = None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                os.close(r)
                return {"killed": False, "status": status, "took": time.perf_counter() - start,
                        "save": time.perf_counter() - changed if changed else None}
            now = time.perf_counter()
            if changed is None and files() != base:
                changed = now
            origin = changed if after_change else start
            if delay is not None and origin is not None and now - origin >= delay:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(r)
                return {"killed": True, "during_save": changed is not None, "delay": delay}
            time.sleep(0.0003)

    first = run(False)  # the first version, complete: how long a build and its save take here
    assert first["status"] == 0 and first["save"], first
    print(json.dumps({"calibration": first}), flush=True)
    # At least `attempts`; more (up to four times as many) while fewer than a third of the kills hit a save or
    # one version never answered: the kill moments are random and the machine's speed varies, so the test
    # keeps going until it has tested what it means to, rather than passing or failing on a thin sample.
    hits, kinds, i = 0, set(), 0
    while i < attempts or (i < 4 * attempts and (hits < attempts // 3 or len(kinds) < 2)):
        int8 = i % 2 == 0  # every attempt changes the KV storage type: a mix of versions cannot load
        if i % 4 == 3:
            row = run(int8, rng.uniform(0, first["took"]), after_change=False)
        else:
            row = run(int8, rng.uniform(0, 1.3 * first["save"]))
        row.update(attempt=i, int8=int8, check=check())
        print(json.dumps(row), flush=True)
        hits += bool(row["killed"] and row["during_save"])
        kinds |= {row["check"]["kv"]} if isinstance(row["check"], dict) and row["check"].get("ok") else set()
        i += 1
''')


def test_builds_killed_at_random_moments_leave_a_knowledge_base_that_answers(tmp_path, tiny_model_dir):
    """kill -9 of `cag build` at random moments, most of them while it saves: after every kill the knowledge
    base loads and answers, from one version or the other."""
    docs = _docs(tmp_path / "docs")
    home = tmp_path / "home"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "CAG_HOME": str(home), "OMP_NUM_THREADS": "1", "CAG_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("CAG_SIGNING_KEY", None)
    attempts = 24
    proc = subprocess.run([sys.executable, str(driver), str(docs), str(tiny_model_dir), str(home / "kbs" / "kb"),
                           str(attempts), "7"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    kills = [r for r in rows if r.get("killed")]
    assert attempts + 1 <= len(rows) <= 4 * attempts + 1
    assert len([r for r in kills if r["during_save"]]) >= attempts // 3, rows  # the kills did hit the saves
    broken = [r for r in rows[1:] if not (isinstance(r["check"], dict) and r["check"].get("ok"))]
    assert not broken, "\n".join(json.dumps(r) for r in broken)
    kinds = {r["check"]["kv"] for r in rows[1:]}
    assert kinds == {"float32", "int8"}, rows  # both versions were seen answering


# -- a full disk -------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB file system (tmpfs), or None where this process may not mount one."""
    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)],
                             capture_output=True).returncode == 0 if os.geteuid() == 0 else False
    yield where if mounted else None
    if mounted:
        subprocess.run(["umount", str(where)], check=True)


def _file_size_limit(limit: int):
    """For the child: writes past `limit` bytes per file fail with EFBIG (SIGXFSZ ignored), a real OS error."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_is_a_one_line_error_and_the_previous_version_keeps_answering(tmp_path, tiny_model_dir,
                                                                                 small_disk):
    """A float32 rebuild of an int8 knowledge base needs over three times the space (320 KB for its 100 KB):
    on a full file system it is refused with one line (exit 1), and `cag ask` still answers from the int8
    cache.

    Where this process may not mount a tmpfs, the same happens through a per-file size limit
    (RLIMIT_FSIZE: the write fails with EFBIG instead of ENOSPC), which is still a real failed write."""
    from conftest import SAMPLE_DOCS

    docs = _docs(tmp_path / "docs")
    (docs / "policies.md").write_bytes((SAMPLE_DOCS / "02_policies.md").read_bytes())  # ~630 tokens in all
    home = (small_disk or tmp_path) / "home"
    run(["build", docs, "--name", "kb", "--model", tiny_model_dir, "--kv-int8", "--reserve", "256"], home)
    cache = home / "kbs" / "kb" / "cache.safetensors"
    env = {**os.environ, "CAG_HOME": str(home)}
    env.pop("CAG_SIGNING_KEY", None)
    limit = None if small_disk else _file_size_limit(cache.stat().st_size * 2)
    proc = subprocess.run([sys.executable, "-m", "cag", "build", str(docs), "--name", "kb", "--model",
                           str(tiny_model_dir), "--reserve", "256"], capture_output=True, text=True, env=env,
                          preexec_fn=limit, timeout=300)
    assert_one_line_error(proc, "No space left on device" if small_disk else "File too large", "cache.safetensors",
                          "make room and run it again")
    asked = run(["ask", "kb", "Who founded it?", "--max-new-tokens", "2"], home)
    assert "[cache]" in asked.stderr
    assert json.loads(run(["inspect", "kb", "--json"], home).stdout)["manifest"]["kv_quant"] == "int8"
    assert not list(cache.parent.glob(".*.tmp")) and not (cache.parent / disk_tier.STAGED_DIR).exists()


def test_a_safetensors_write_error_becomes_the_os_error_it_is(tmp_path):
    """safetensors reports I/O failures as SafetensorError; cag.engines.files.os_errors makes those OSErrors (what the
    CLI shows as one line) and leaves every other SafetensorError alone."""
    from safetensors import SafetensorError

    from cag.engines.files import os_errors

    with pytest.raises(OSError) as caught:
        with os_errors(tmp_path / "x"):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert caught.value.errno == 28 and caught.value.filename == str(tmp_path / "x")
    with pytest.raises(SafetensorError):
        with os_errors(tmp_path / "x"):
            raise SafetensorError("Error while serializing: invalid header")


def test_a_full_disk_while_the_server_builds_is_a_507_and_changes_nothing(tmp_path, small_disk, sharp_lm,
                                                                           monkeypatch):
    """A knowledge base created over HTTP on a full disk: 507 insufficient_storage (never a 500), and the
    server goes on answering what it had."""
    import httpx
    from serverutil import serving

    from cag.server import ServerConfig, create_app

    if small_disk is None:
        pytest.skip("this process may not mount a small file system")
    monkeypatch.setenv("CAG_HOME", str(small_disk / "home"))
    monkeypatch.delenv("CAG_SIGNING_KEY", raising=False)
    with serving(create_app(ServerConfig(response_cache=False), sharp_lm)) as url:
        small = httpx.post(url + "/v1/kbs", json={"name": "small", "documents": [{"name": "a.md", "text": "A lamp."}]})
        assert small.status_code == 201, small.text
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        (small_disk / "filler").write_bytes(b"\0" * max(0, free - 40_000))  # room for the documents, not the cache
        big = httpx.post(url + "/v1/kbs", json={"name": "big", "documents": [
            {"name": "b.md", "text": "The Heron lantern costs 148 crowns. " * 40}]}, timeout=120)
        assert big.status_code == 507 and big.json()["error"]["code"] == "insufficient_storage", big.text
        ask = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "small", "max_tokens": 4, "messages": [{"role": "user", "content": "What is it?"}]})
        assert ask.status_code == 200, ask.text
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["small"]
