"""Effect of int8 KV storage on answers and bytes (default model, sample knowledge base).

    .venv/bin/python bench/kvquant.py [--max-new-tokens 48]

For every sample question: the answer from the exact cache vs from the cache after an int8 round trip
(what `kv_quant="int8"` files hold): identical-answer rate, and accuracy (answer contains the reference).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    import cag
    import torch_direct as direct
    from cag.engines.torch import models
    from cag.cache import kvfile
    from cag.engines import kvquant
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    lm = models.load(None)
    home = Path(tempfile.mkdtemp(prefix="cag-bench-"))
    os.environ["CAG_HOME"] = str(home)
    kb = cag.build([common.SAMPLE_DOCS], name="q", lm=lm)
    sizes = {}
    for label, layers, quant in (("fp32", kb.layers, None),
                                 ("bf16", [(k.to(torch.bfloat16), v.to(torch.bfloat16)) for k, v in kb.layers], None),
                                 ("int8", kb.layers, "int8")):
        path = home / f"{label}.safetensors"
        kvfile.save(path, layers, kb.prefix_ids, {}, kv_quant=quant)
        sizes[label] = path.stat().st_size
    q_layers = [(kvquant.roundtrip(k), kvquant.roundtrip(v)) for k, v in kb.layers]
    stops = lm.stop_ids
    rows = common.sample_questions()
    same = exact_ok = quant_ok = 0
    for row in rows:
        split = kb.builder.split(row["q"])
        exact = kb.ask(row["q"], max_new_tokens=args.max_new_tokens)
        quant = list(direct.generate(lm, split.new_ids, prefix=q_layers, reuse=split.reuse,
                                     max_new_tokens=args.max_new_tokens, stop_ids=stops))
        quant_text = lm.codec.decode(quant)
        same += quant == exact.token_ids
        exact_ok += row["a"].lower() in exact.answer.lower()
        quant_ok += row["a"].lower() in quant_text.lower()
    n = len(rows)
    result = {"machine": common.machine(), "knowledge_tokens": kb.tokens, "questions": n, "file_bytes": sizes,
              "identical": same, "accuracy": {"exact": exact_ok / n, "int8": quant_ok / n}}
    path = common.write_results("kvquant", result, args.out)
    print(f"{n} sample questions, {kb.tokens}-token prefix, model dtype {lm.dtype}")
    print(common.table([
        ("fp32 (exact)", f"{sizes['fp32'] / 1e6:.1f}", "-", f"{exact_ok}/{n}"),
        ("bf16", f"{sizes['bf16'] / 1e6:.1f}", "-", "-"),
        ("int8 + fp16 scales", f"{sizes['int8'] / 1e6:.1f}", f"{same}/{n}", f"{quant_ok}/{n}"),
    ], ("KV storage", "file MB", "answers identical to exact", "answers containing the fact")))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
