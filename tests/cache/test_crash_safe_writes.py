"""Crash-safe writes: a writer killed mid-write leaves a temp file; the next write to the same file cleans it."""

import os
import signal
import subprocess
import sys
import time

from cag.cache import atomic


def test_temp_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "cache.safetensors"
    # a real writer process, killed with SIGKILL in the middle of writing (it waits there, on its stdin, for
    # as long as the test takes: it cannot finish the write first)
    code = ("import sys; from cag.cache import atomic\n"
            "with atomic.replacing(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'x' * 1_000_000); print('writing', flush=True); sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "writing"
    leftovers = list(tmp_path.glob(".cache.safetensors.*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size == 1_000_000
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdin.close()
    assert leftovers[0].exists()  # what kill -9 leaves behind
    atomic.write_text(target, "new")
    assert target.read_text() == "new" and not list(tmp_path.glob("*.tmp"))


def test_a_live_writer_keeps_its_temp_file(tmp_path):
    target = tmp_path / "kb.json"
    with atomic.replacing(target) as tmp:
        tmp.write_text("half")
        atomic.write_text(tmp_path / "other.json", "{}")  # another file in the folder: unrelated
        assert atomic.clean_stale(target) == [] and tmp.exists()  # this process is alive
    assert target.read_text() == "half"


def test_old_temp_files_of_other_machines_are_removed_after_a_day(tmp_path):
    target = tmp_path / "cache.safetensors"
    recent = tmp_path / ".cache.safetensors.otherhost-123.abc.tmp"
    old = tmp_path / ".cache.safetensors.abc123.tmp"  # the name format before writers were named
    for f in (recent, old):
        f.write_bytes(b"x")
    day_ago = time.time() - atomic.FOREIGN_STALE_S - 60
    os.utime(old, (day_ago, day_ago))
    assert atomic.clean_stale(target) == [old]
    assert recent.exists()
