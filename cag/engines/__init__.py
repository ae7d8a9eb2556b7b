"""Engines: the code that runs a model, behind one seam (cag.engines.base.Engine).

`load(spec)` picks the engine from what the user named:
- a `.gguf` file or `ollama:NAME[:TAG]` -> llama.cpp (cag.engines.llamacpp): weights stay quantized and
  memory-mapped, as Ollama and LM Studio run them;
- the default model, a Hugging Face folder or hub id -> transformers (cag.engines.torch), the reference.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from .base import Engine

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_KV_TYPES = ("f16", "bf16", "q8_0")  # a GGUF model's KV cache types; the first is the default


def kv_type_problem(kv_type: str | None) -> str | None:
    """What is wrong with `kv_type` as a GGUF model's KV cache type (None: nothing, or none was given), for
    the CLI, the server config and the engine to refuse it alike."""
    if kv_type is None or kv_type in GGUF_KV_TYPES:
        return None
    return f"must be {', '.join(GGUF_KV_TYPES[:-1])} or {GGUF_KV_TYPES[-1]} (got {kv_type!r})"

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def kind_of(spec: str | None) -> str:
    """Which engine runs the model named `spec`: "llamacpp" or "torch". A GGUF file is known by its suffix or,
    without one (an Ollama blob, a renamed download), by its first bytes."""
    if spec and (spec.startswith("ollama:") or Path(spec).suffix.lower() == ".gguf" or _gguf_bytes(spec)):
        return "llamacpp"
    return "torch"


def _gguf_bytes(spec: str) -> bool:
    try:
        with open(Path(spec).expanduser(), "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # not a file (a folder, a hub id, nothing)
        return False


def load(spec: str | None = None, *, device: str | None = None, dtype: str | None = None,
         threads: int | None = None, kv_type: str | None = None, context: int | None = None,
         log: Log = _stderr) -> Engine:
    """The engine for the model named `spec` (None: the default model).

    `threads` sets the CPU threads (both engines; default: CAG_THREADS, else torch's / llama.cpp's own
    choice). `kv_type` ("f16", "bf16", "q8_0") and `context` (the context size) apply to llama.cpp; `device`
    and `dtype` to transformers."""
    if kind_of(spec) == "llamacpp":
        from .llamacpp import load as load_gguf

        if dtype not in (None, "", "auto"):
            from ..errors import ModelError

            raise ModelError(f"--dtype {dtype} applies to Hugging Face models; a GGUF model runs in its own "
                             "quantization (use --kv-type for the KV cache)")
        return load_gguf(spec, threads=threads, kv_type=kv_type, context=context, log=log)
    from .. import settings
    from .torch import models

    chosen = threads if threads is not None else settings.current().threads
    set_threads(chosen)
    engine = models.load(spec, device=device, dtype=dtype, log=log)
    if chosen is None and engine.device.type == "cpu":  # a count the user gave is kept as given
        import torch

        from .cores import Cores

        engine.state.cores = Cores(torch.get_num_threads())
    return engine


def fingerprint_now(spec: str | None, recorded: str | None) -> tuple[Path, str]:
    """(where, fingerprint) of the model named `spec` as it is on disk now, computed as a load computes it
    but without loading it, so that a cache can be checked against its model cheaply (`cag ls --verify`):
    file hashes are memoized (cag.engines.files). A GGUF file or Ollama blob is the one `spec` resolves to;
    a transformers model is the folder its cache recorded (`recorded`: a hub id or the default model are not
    fetched or converted again). ModelMissingError when it is gone."""
    if kind_of(spec) == "llamacpp":
        from .llamacpp import fingerprint, resolve

        path = resolve(spec)
        return path, fingerprint(spec, path)
    from .torch.models import model_fingerprint

    folder = Path(recorded or "")
    if not recorded or not (folder / "config.json").is_file():
        from .missing import no_model_at

        raise no_model_at(folder)
    return folder, model_fingerprint(folder)


def set_threads(threads: int | None) -> None:
    """CPU threads for torch and cag's C kernels (they share torch's OpenMP runtime); None: unchanged."""
    if threads is None:
        return
    import torch

    if threads < 1:
        from ..errors import CagError

        raise CagError(f"threads must be at least 1 (got {threads})")
    torch.set_num_threads(threads)
