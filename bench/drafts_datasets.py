"""Drafted answers against undrafted ones on the example datasets (fictional-1k/3k/6k), the default model.

    .venv/bin/python bench/drafts_datasets.py [--max-tokens 96]

Every question of each dataset, greedy, cached, asked with drafts (the default) and without: the answers
must be the same tokens. Prints per dataset how many are, the draft tokens verified and taken, and the
decode rate of both; writes bench/results/drafts-datasets.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--out", type=Path, default=common.RESULTS / "drafts-datasets.json")
    args = ap.parse_args()
    os.environ.setdefault("CAG_HOME", tempfile.mkdtemp(prefix="cag-drafts-data-"))
    import cag

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in ("1k", "3k", "6k"):
            data = json.loads((common.ROOT / "examples" / "datasets" / f"fictional-{size}.json").read_text())
            folder = Path(tmp) / size
            folder.mkdir()
            for i, doc in enumerate(data["documents"]):  # names are titles: one Markdown file each
                (folder / f"{i:02d}.md").write_text(f"# {doc['name']}\n\n{doc['text']}\n")
            kb = cag.build([folder], name=f"drafts-{size}", log=lambda _m: None)
            kb.ask("What is this about?", max_new_tokens=8, sources=0)
            questions = [q["q"] for q in data["questions"]]
            runs = {d: [kb.ask(q, max_new_tokens=args.max_tokens, sources=0, draft=d) for q in questions]
                    for d in (0, None)}
            same = sum(a.token_ids == b.token_ids for a, b in zip(runs[0], runs[None]))
            rate = {d: sum(max(0, a.new_tokens - 1) for a in r) / sum(a.total_s - a.ttft_s for a in r)
                    for d, r in runs.items()}
            rows.append({"dataset": f"fictional-{size}", "knowledge_tokens": kb.tokens, "questions": len(questions),
                         "same": same, "drafted": sum(a.drafted for a in runs[None]),
                         "accepted": sum(a.accepted for a in runs[None]),
                         "decode_tok_s_without": rate[0], "decode_tok_s_with": rate[None]})
            r = rows[-1]
            print(f"{r['dataset']:<15} {r['knowledge_tokens']:>6} tokens  same {same}/{len(questions)}  drafts taken "
                  f"{r['accepted']}/{r['drafted']}  decode {rate[0]:.1f} -> {rate[None]:.1f} tok/s", flush=True)
    args.out.write_text(json.dumps({"machine": common.machine(), "max_tokens": args.max_tokens, "rows": rows},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
