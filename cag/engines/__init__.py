"""Engines: the code that runs a model, behind one seam (cag.engines.base.Engine).

`load(spec)` picks the engine from what the user named:
- a `.gguf` file or `ollama:NAME[:TAG]` -> llama.cpp (cag.engines.llamacpp): weights stay quantized and
  memory-mapped, as Ollama and LM Studio run them;
- the default model, a Hugging Face folder or hub id -> transformers (cag.engines.torch), the reference.
"""

from __future__ import annotations

from pathlib import Path

from ..log import Log, stderr
from .base import Engine
from .options import GGUF_KV_TYPES, EngineOptions, kind_of, kv_type_problem  # noqa: F401 - the package's names

DEFAULT_MODEL = "smollm2-135m-instruct"


def load(model: str | EngineOptions | None = None, *, log: Log = stderr, **options) -> Engine:
    """The engine for `model`: a name (None: the default model) with `options` as EngineOptions' fields,
    or an EngineOptions whole. `device` and `dtype` apply to transformers, `kv_type` and `context` to
    llama.cpp, `threads` to both (default: CAG_THREADS, else torch's / llama.cpp's own choice)."""
    chosen = model if isinstance(model, EngineOptions) else EngineOptions.of(model=model, **options)
    if chosen.kind == "llamacpp":
        from .llamacpp import load as load_gguf

        if chosen.dtype not in (None, "", "auto"):
            from ..errors import ModelError

            raise ModelError(f"--dtype {chosen.dtype} applies to Hugging Face models; a GGUF model runs in its own "
                             "quantization (use --kv-type for the KV cache)")
        return load_gguf(chosen.model, threads=chosen.threads, kv_type=chosen.kv_type, context=chosen.context, log=log)
    return _load_torch(chosen, log)


def _load_torch(chosen: EngineOptions, log: Log) -> Engine:
    from .. import settings
    from .torch import models

    threads = chosen.threads if chosen.threads is not None else settings.current().threads
    set_threads(threads)
    engine = models.load(chosen.model, device=chosen.device, dtype=chosen.dtype, log=log)
    if threads is None and engine.device.type == "cpu":  # a count the user gave is kept as given
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


def model_key(spec: str) -> str:
    """One name for one model however it is named: a GGUF model by its sha256 (memoized per file), so that a
    file named by two paths, or by its path and as `ollama:NAME:TAG`, is the same model; other models by
    their name. A model that cannot be found keeps its name (loading it then says what is wrong)."""
    if kind_of(spec) != "llamacpp":
        return spec
    from ..errors import CagError

    try:
        return "gguf:" + fingerprint_now(spec, None)[1]
    except CagError:
        return spec


def file_bytes(spec: str | None) -> int:
    """About what a model's weights will take before it is loaded: its GGUF file's size (0 if unknown: an
    Ollama name, a transformers model, a file that cannot be read)."""
    if spec and kind_of(spec) == "llamacpp" and not spec.startswith("ollama:"):
        try:
            return Path(spec).expanduser().stat().st_size
        except OSError:
            return 0
    return 0


def set_threads(threads: int | None) -> None:
    """CPU threads for torch and cag's C kernels (they share torch's OpenMP runtime); None: unchanged."""
    if threads is None:
        return
    import torch

    if threads < 1:
        from ..errors import CagError

        raise CagError(f"threads must be at least 1 (got {threads})")
    torch.set_num_threads(threads)
