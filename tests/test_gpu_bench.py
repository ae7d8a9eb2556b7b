"""bench/gpu.py's small CPU configuration runs end to end (CI exercises the script the GPU run uses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_bench_small_runs_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--small", "--sizes", "128,384",
                           "--repeats", "1", "--new-tokens", "6", "--load-size", "384"],
                          capture_output=True, text=True, env={**os.environ, "OUT": str(tmp_path)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["small"] and result["device"] == "cpu"
    assert [r["tokens"] for r in result["rows"]] == [128, 384]
    for row in result["rows"]:
        for name in ("cag-cache", "cag-recompute", "hf-full", "hf-prefix"):
            assert 0 < row[name]["ttft_s"] <= row[name]["total_s"]
            assert row[name]["decode_tok_s"] > 0
        assert row["same_tokens_cache_vs_recompute"]  # float32 greedy: the cache must not change the tokens
    kv = result["rows"][1]["kv_bytes"]
    assert kv == 4 * 2 * 2 * 384 * 64 * 4  # layers * (k, v) * kv heads * tokens * head dim * float32
    load = result["rows"][1]["load"]
    assert load["bytes"] == kv and all(load[k]["GB_s"] > 0 for k in ("file_cag_verified", "file_safetensors",
                                                                       "host_to_device"))
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("384 ")  # the table comes last
