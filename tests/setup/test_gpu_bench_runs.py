"""bench/gpu.py's small CPU configuration runs end to end from a bare checkout (CI exercises the script the
GPU run uses), and every bench script finds the checkout's own cag without being installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def bare_env(**extra) -> dict:
    """No PYTHONPATH: the script alone must make the checkout importable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


def test_gpu_bench_small_runs_on_cpu_from_a_bare_checkout(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--small", "--sizes", "128,256",
                           "--repeats", "1", "--new-tokens", "6", "--exact-tokens", "160", "--exact-questions", "2",
                           "--batch-tokens", "128", "--batches", "1,4", "--restore-tokens", "2048",
                           "--restore-repeats", "2"],
                          capture_output=True, text=True, env=bare_env(OUT=str(tmp_path)), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["small"] and result["device"] == "cpu"
    assert result["cag_from"] == str(ROOT / "cag")  # the checkout's cag, not an installed one
    sections = result["sections"]
    assert [k for k in sections] == ["warm-up", "exact", "restore", "batch", "ttft-128", "ttft-256"]
    assert not [k for k, v in sections.items() if "error" in v or "skipped" in v], sections
    for n in (128, 256):
        row = sections[f"ttft-{n}"]
        for name in ("cag-cache", "cag-recompute", "hf-full", "hf-prefix"):
            assert 0 < row[name]["ttft_s"] <= row[name]["total_s"] and row[name]["decode_tok_s"] > 0
        assert row["kv_bytes"] == 4 * 2 * 2 * n * 64 * 4  # layers * (k, v) * kv heads * tokens * head dim * float32
    exact = sections["exact"]  # float32 on the CPU: the cache, the piecewise reference and one-shot generate agree
    assert exact["cached_eq_reference_tokens"] == exact["cached_eq_reference_logits_bits"] == 2
    assert exact["cached_eq_hf_one_shot_tokens"] == 2 and exact["pieces"] == 2
    assert 0 <= exact["cached_eq_hf_one_shot_logits_bits"] <= 2  # reported, not required: one forward rounds otherwise
    restore = sections["restore"]
    assert restore["bytes"] == 4 * 2 * 2 * 2048 * 64 * 4
    assert {"cag verified (blake3)", "cag verified (sha256)"} <= set(restore["cases"])
    assert all(c["GB_s"] > 0 for c in restore["cases"].values())
    assert [r["questions"] for r in sections["batch"]["rows"]] == [1, 4]
    assert all(r["cag_tok_s"] > 0 and r["hf_tok_s"] > 0 for r in sections["batch"]["rows"])
    lines = proc.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("section "))
    table = lines[header + 2:]  # the one table comes last: every row of every section
    assert [line.split("|")[0].strip() for line in table] == [
        "exact", "restore GB/s", "restore GB/s", "batch tok/s", "batch tok/s"] + ["TTFT ms", "decode tok/s", "prefill"] * 2


def test_a_failing_section_is_recorded_and_the_run_goes_on(tmp_path):
    """A failing section (an empty prefix) and a failing measurement (a batch of no questions) are error
    rows in the table and the JSON, not the end of the run: a GPU session cannot afford a crash halfway."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--small", "--sizes", "64",
                           "--repeats", "1", "--new-tokens", "2", "--exact-tokens", "0", "--batches", "0,2",
                           "--batch-tokens", "64", "--sections", "exact,batch,ttft"],
                          capture_output=True, text=True, env=bare_env(OUT=str(tmp_path)), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    sections = json.loads((tmp_path / "gpu.json").read_text())["sections"]
    assert "error" in sections["exact"]
    assert "error" in sections["batch"]["rows"][0] and sections["batch"]["rows"][1]["cag_tok_s"] > 0
    assert "ttft_s" in sections["ttft-64"]["cag-cache"]
    table = proc.stdout.splitlines()
    assert any(line.startswith("exact ") and "ERROR" in line for line in table)
    assert any(line.startswith("batch tok/s") and "ERROR" in line for line in table)


def test_every_bench_script_imports_the_checkouts_cag(tmp_path):
    scripts = sorted(p for p in (ROOT / "bench").glob("*.py") if p.name != "common.py")
    probe = (
        "import importlib.util, runpy, sys\n"
        f"root = {str(ROOT)!r}\n"
        "for script in sys.argv[1:]:\n"
        "    sys.path[:] = [p for p in sys.path if p.rstrip('/') != root]  # each script on its own\n"
        "    for name in [m for m in sys.modules if m == 'common' or m == 'cag' or m.startswith('cag.')]:\n"
        "        del sys.modules[name]\n"
        "    sys.argv = [script, '--help']\n"
        "    try:\n"
        "        runpy.run_path(script, run_name='__main__')\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    print(script, importlib.util.find_spec('cag').origin)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe, *map(str, scripts)], capture_output=True, text=True,
                          env=bare_env(), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    found = dict(line.split() for line in proc.stdout.splitlines() if line.startswith(str(ROOT)))
    assert found == {str(s): str(ROOT / "cag" / "__init__.py") for s in scripts}
