"""Shared bits for the benchmarks: a knowledge base of a chosen size, timing, tables, result files.

Every bench script imports this module first: it puts the repository root on sys.path, so the scripts
run from a bare checkout (a GPU machine gets the checkout, not an installed cag) and always measure the
checkout's own cag, even where another copy is installed.
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "tests"))  # torch_direct: the torch engine's harness, kept with the tests
SAMPLE_DOCS = ROOT / "examples" / "sample_kb" / "docs"
SAMPLE_QUESTIONS = ROOT / "examples" / "sample_kb" / "questions.jsonl"
RESULTS = ROOT / "bench" / "results"


def sample_questions() -> list[dict]:
    return [json.loads(line) for line in SAMPLE_QUESTIONS.read_text().splitlines() if line.strip()]


def padded_knowledge(folder: Path, tokenizer, target_tokens: int, seed: int = 0) -> Path:
    """The sample docs plus a generated appendix of fictional inventory lines, up to ~target_tokens."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    for f in SAMPLE_DOCS.iterdir():
        shutil.copy(f, folder / f.name)
    have = sum(len(tokenizer(f.read_text())["input_ids"]) for f in folder.iterdir())
    rng = random.Random(seed)
    items = ["wick", "brass hinge", "cobalt tint", "copper handle", "glass chimney", "seagrass crate", "oil funnel"]
    lines = ["# Appendix: Tinder Lane inventory"]
    while have + len(tokenizer("\n".join(lines))["input_ids"]) < target_tokens:
        lines.append(f"- Shelf {rng.randint(1, 99)}{rng.choice('ABCDEFG')}: {rng.randint(2, 400)} x "
                     f"{rng.choice(items)}, last counted by {rng.choice(['Ilse', 'Tobiah', 'Marrek', 'Amund'])} "
                     f"on day {rng.randint(1, 365)}.")
    (folder / "99_inventory.md").write_text("\n".join(lines[:-1]) + "\n")
    return folder


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    import transformers

    info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip()
    except OSError:
        pass
    return info


def table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), "-+-".join("-" * w for w in widths)]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)


def write_results(name: str, data: dict, out: Path | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = out or RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path
