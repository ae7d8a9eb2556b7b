"""Random-weight GGUF models of a real shape, for tests and benchmarks: gguf-py writes a float16 file,
llama.cpp's own quantize API turns it into the quantization people run (Q4_K_M by default).

Why random weights: a model's speed depends on its shape and quantization, not on what its weights say,
and the big shapes (Mistral-7B, Llama-3.2-1B) are not on the package index. The tokenizer is borrowed
from a real GGUF (its vocabulary, merges and chat template), so prompts tokenize as they would.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import lib


@dataclass(frozen=True)
class Shape:
    arch: str  # "llama" or "qwen2" (q/k/v biases)
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    context: int = 4096
    rope_base: float = 10000.0
    vocab: int = 0  # rows of the embedding and output matrices; the borrowed vocabulary is padded up to it


SHAPES = {
    # the seed's own model size: Mistral-7B-Instruct (a llama-architecture model with GQA)
    "mistral-7b": Shape("llama", 32, 4096, 14336, 32, 8, 32768, 1000000.0, 32768),
    "llama-3.2-1b": Shape("llama", 16, 2048, 8192, 32, 8, 131072, 500000.0, 128256),
    "tiny-llama": Shape("llama", 2, 256, 512, 4, 2, 2048),
    "tiny-qwen2": Shape("qwen2", 2, 256, 512, 4, 2, 2048, 1000000.0),
}

_FTYPES = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
           "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}


def write(out: Path, shape: Shape, tokenizer_from: Path, quant: str = "Q4_K_M", seed: int = 0,
          threads: int | None = None) -> Path:
    """Write a random-weight GGUF of `shape` quantized as `quant` to `out` (atomically); returns `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".synth-") as tmp:
        f16 = Path(tmp) / "f16.gguf"
        _write_f16(f16, shape, tokenizer_from, seed)
        part = Path(tmp) / "q.gguf"
        quantize(f16, part, quant, threads)
        os.replace(part, out)
    return out


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None) -> None:
    """llama.cpp's quantize (llama_model_quantize) of GGUF `src` into `dst`."""
    L = lib.api()
    params = L.llama_model_quantize_default_params()
    params.ftype = getattr(L, _FTYPES[quant])
    params.nthread = threads or os.cpu_count() or 1
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {quant} (code {rc})")


def _write_f16(path: Path, shape: Shape, tokenizer_from: Path, seed: int) -> None:
    import gguf

    source = gguf.GGUFReader(str(tokenizer_from))
    vocab = max(len(source.fields["tokenizer.ggml.tokens"].data), shape.vocab)
    w = gguf.GGUFWriter(str(path), shape.arch)
    w.add_name(f"random {shape.arch} {shape.layers}x{shape.hidden}")
    w.add_block_count(shape.layers)
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.hidden)
    w.add_feed_forward_length(shape.ffn)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(shape.rope_base)
    w.add_rope_dimension_count(shape.hidden // shape.heads)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    _copy_tokenizer(source, w, vocab)
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(1 << 20) * 0.02).astype(np.float16)  # tiled: a 7B model in seconds, not minutes

    def tensor(name: str, rows: int, cols: int) -> None:
        n = rows * cols
        data = np.resize(np.roll(pool, rng.integers(len(pool))), n).reshape(rows, cols)
        w.add_tensor(name, data)

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    head = shape.hidden // shape.heads
    tensor("token_embd.weight", vocab, shape.hidden)
    norm("output_norm.weight", shape.hidden)
    tensor("output.weight", vocab, shape.hidden)
    for i in range(shape.layers):
        b = f"blk.{i}."
        norm(b + "attn_norm.weight", shape.hidden)
        tensor(b + "attn_q.weight", shape.heads * head, shape.hidden)
        tensor(b + "attn_k.weight", shape.kv_heads * head, shape.hidden)
        tensor(b + "attn_v.weight", shape.kv_heads * head, shape.hidden)
        tensor(b + "attn_output.weight", shape.hidden, shape.heads * head)
        if shape.arch == "qwen2":
            for part, n in (("q", shape.heads * head), ("k", shape.kv_heads * head), ("v", shape.kv_heads * head)):
                w.add_tensor(b + f"attn_{part}.bias", (rng.standard_normal(n) * 0.02).astype(np.float32))
        norm(b + "ffn_norm.weight", shape.hidden)
        tensor(b + "ffn_gate.weight", shape.ffn, shape.hidden)
        tensor(b + "ffn_up.weight", shape.ffn, shape.hidden)
        tensor(b + "ffn_down.weight", shape.hidden, shape.ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _copy_tokenizer(source, w, vocab: int) -> None:
    """The vocabulary, merges, token types, special ids and chat template of another GGUF; the vocabulary
    padded with unused tokens up to `vocab` (a real shape's embedding size)."""
    fields = source.fields

    def strings(key: str) -> list[str]:
        f = fields[key]
        return [bytes(f.parts[i]).decode("utf-8", "surrogateescape") for i in f.data]

    def scalar(key: str):
        f = fields.get(key)
        return None if f is None else f.parts[f.data[0]][0]

    w.add_tokenizer_model(bytes(fields["tokenizer.ggml.model"].parts[-1]).decode())
    if "tokenizer.ggml.pre" in fields:
        w.add_tokenizer_pre(bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode())
    tokens = strings("tokenizer.ggml.tokens")
    pad = [f"<|cag_unused_{i}|>" for i in range(vocab - len(tokens))]
    w.add_token_list(tokens + pad)
    if "tokenizer.ggml.merges" in fields:
        w.add_token_merges(strings("tokenizer.ggml.merges"))
    if "tokenizer.ggml.scores" in fields:
        f = fields["tokenizer.ggml.scores"]
        w.add_token_scores([float(f.parts[i][0]) for i in f.data] + [0.0] * len(pad))
    f = fields["tokenizer.ggml.token_type"]
    w.add_token_types([int(f.parts[i][0]) for i in f.data] + [5] * len(pad))  # 5: unused
    for key, add in (("tokenizer.ggml.bos_token_id", w.add_bos_token_id), ("tokenizer.ggml.eos_token_id", w.add_eos_token_id),
                     ("tokenizer.ggml.padding_token_id", w.add_pad_token_id),
                     ("tokenizer.ggml.unknown_token_id", w.add_unk_token_id)):
        value = scalar(key)
        if value is not None:
            add(int(value))
    for key, add in (("tokenizer.ggml.add_bos_token", w.add_add_bos_token),):
        value = scalar(key)
        if value is not None:
            add(bool(value))
    if "tokenizer.chat_template" in fields:
        w.add_chat_template(bytes(fields["tokenizer.chat_template"].parts[-1]).decode())
