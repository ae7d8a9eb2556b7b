"""The cache file: one safetensors file whose header carries a JSON manifest.

Why one file: a single atomic rename replaces tensors and manifest together, so a crash can never pair
new tensors with an old manifest. Why safetensors: loading it parses a JSON header and copies bytes;
nothing is ever unpickled. The manifest pins everything the cache depends on (model, tokenizer,
prompt template, knowledge, dtype, shapes, the pieces its prefix was computed in) plus a digest of every
tensor byte and of the manifest itself (cag.checksum: BLAKE3 or SHA-256 over 8 MiB pieces), and can be
signed with HMAC-SHA256 (CAG_SIGNING_KEY) so that a tampered file cannot pass as genuine.

Loading goes through cag.restore: the bytes are read, hashed and copied to the device in one pipeline,
and handed out only once the digest matched. Files with any earlier checksum method still verify.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from .. import __version__
from ..engines import kvquant
from ..engines.files import os_errors
from ..errors import CacheFileError, CacheMismatchError
from . import atomic, checksum, restore

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [1, kv_heads, tokens, head_dim]

FORMAT = "cag-kv"
FORMAT_VERSION = 1
MANIFEST_KEY = "cag_manifest"
SIGNING_KEY_ENV = "CAG_SIGNING_KEY"
CHECKSUM = checksum.default_method()  # manifest["checksum"] of new files: how tensors_sha256 was computed
BLAKE3, SHA256 = checksum.BLAKE3, checksum.SHA256
PIECES = checksum.SHA256_TENSORS  # earlier files: tensor pieces only; absent: one sequential sha256 over the tensors
PIECE = checksum.PIECE
HOST_TENSORS = frozenset({"prefix_ids"})  # read into CPU memory whatever the device: the ids are used there


@dataclass(frozen=True)
class Expect:
    """What a cache must have been made for; None skips a check."""

    model: str | None = None
    tokenizer: str | None = None
    template: str | None = None
    knowledge: str | None = None
    dtype: str | None = None
    kv: str | None = None  # how the KV is stored: its dtype name, or the quantization ("int8")
    engine: str | None = None  # "torch" or "llamacpp"
    runtime: str | None = None  # the engine's own version and build (llama.cpp's: its state format follows it)
    context: int | None = None  # the context size the prefix state was made in (llama.cpp)


def kv_storage(manifest: dict) -> str:
    """What a cache's KV is stored as: its quantization, else its dtype ("int8", "float32", "bfloat16")."""
    return manifest.get("kv_quant") or manifest.get("dtype")


@dataclass
class Loaded:
    manifest: dict
    layers: KV
    prefix_ids: list[int]
    state: torch.Tensor | None = None  # an engine's opaque prefix state (llama.cpp), instead of layers


def engine_of(manifest: dict) -> str:
    """The engine a cache was made by ("torch" for files written before manifests named it)."""
    return manifest.get("engine") or "torch"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save(path: str | Path, layers: KV, prefix_ids: list[int], manifest: dict, kv_quant: str | None = None,
         method: str | None = None, state: torch.Tensor | None = None) -> dict:
    """Write atomically (temp file in the same folder, fsync, rename): a crash leaves the old file intact.

    The prefix is either per-layer keys/values (`layers`, the torch engine) or an engine's opaque state
    bytes (`state`, a uint8 tensor: llama.cpp's per-sequence state; `manifest` then names the engine and
    its "dtype"). kv_quant="int8" stores keys/values as int8 + per-vector scales (lossy, half of bf16);
    load restores the dtype. `method` is the checksum method (default CHECKSUM: BLAKE3 where installed,
    else SHA-256 pieces).
    """
    method = method or CHECKSUM
    if method not in (BLAKE3, SHA256):
        raise CacheFileError(f"unknown checksum method {method!r}: use {BLAKE3} or {SHA256}")
    path = Path(path)
    if kv_quant not in (None, *kvquant.MODES):
        raise CacheFileError(f"unknown KV quantization {kv_quant!r}: use one of {', '.join(kvquant.MODES)}")
    if state is not None:
        if layers or kv_quant or state.dtype != torch.uint8 or state.dim() != 1:
            raise CacheFileError("an engine state is stored as one uint8 tensor, without layers or quantization")
        if not isinstance(manifest.get("dtype"), str) or engine_of(manifest) == "torch":
            raise CacheFileError("a cache of engine state needs its engine and KV type in the manifest")
        tensors = {"prefix_ids": torch.tensor(prefix_ids, dtype=torch.int64), "state": state.contiguous()}
        shape = {"layers": 0, "shapes": {"state": [state.numel()]}}
    else:
        tensors = _tensors(layers, prefix_ids, kv_quant)
        shape = {"engine": engine_of(manifest), "dtype": dtype_name(layers[0][0].dtype), "layers": len(layers),
                 "shapes": {"k": [list(k.shape) for k, _ in layers], "v": [list(v.shape) for _, v in layers]}}
    full = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "cag_version": __version__,
        **manifest,
        "tokens": len(prefix_ids),
        **shape,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checksum": method,
    }
    if kv_quant:
        full["kv_quant"] = kv_quant
    if "prefill_bounds" in full and not _valid_bounds(full["prefill_bounds"], len(prefix_ids)):
        raise ValueError(f"prefill_bounds {full['prefill_bounds']} do not split {len(prefix_ids)} tokens")
    full["tensors_sha256"] = _checksum(tensors, method, full)
    key = signing_key()
    if key is not None:
        full["signature"] = _sign(full, key)
    with atomic.replacing(path) as tmp, os_errors(path):
        save_file(tensors, str(tmp), metadata={MANIFEST_KEY: json.dumps(full, sort_keys=True)})
    return full


def read_manifest(path: str | Path) -> dict:
    """The manifest alone (header only, no tensor bytes read); still refuses files that are not ours."""
    with _open(path) as source:
        return _manifest(str(path), restore.layout(source, str(path)).metadata)


@contextmanager
def _open(path: str | Path) -> Iterator[restore.FileSource]:
    path = Path(path)
    if not path.is_file():
        raise CacheFileError(f"cache file not found: {path}")
    try:
        opened = restore.open_file(path)
        source = opened.__enter__()
    except OSError as err:
        raise CacheFileError(f"cache file {path} cannot be read ({err.strerror or err}); check its permissions") from None
    try:
        yield source
    finally:
        opened.__exit__(None, None, None)


def _manifest(where: str, meta: dict) -> dict:
    if MANIFEST_KEY not in meta:
        raise CacheFileError(f"{where} is a safetensors file but not a cag cache (no manifest)")
    try:
        manifest = json.loads(meta[MANIFEST_KEY])
    except ValueError:
        raise CacheFileError(f"cache file {where} has a damaged manifest; rebuild it") from None
    if not isinstance(manifest, dict):
        raise CacheFileError(f"cache file {where} has a damaged manifest (not a JSON object); rebuild it")
    if manifest.get("format") != FORMAT:
        raise CacheFileError(f"{where} is not a cag cache file (format {manifest.get('format')!r})")
    if type(manifest.get("format_version")) is not int or manifest["format_version"] != FORMAT_VERSION:
        raise CacheMismatchError(where, "format version", FORMAT_VERSION, manifest.get("format_version"))
    for key, kinds in _FIELDS.items():
        optional = key in _OPTIONAL
        if (key not in manifest and not optional) or (key in manifest and not isinstance(manifest[key], kinds)) \
                or isinstance(manifest.get(key), bool):
            want = " or ".join(k.__name__.replace("str", "text").replace("int", "a whole number")
                               .replace("dict", "an object").replace("list", "a list") for k in kinds)
            raise CacheFileError(f"cache file {where} has a damaged manifest: field {key!r} must be {want}; rebuild it")
    for key in IDENTITY:
        inner = manifest.get(key, {})
        if not all(isinstance(v, str) or _whole(v) for v in inner.values()):
            raise CacheFileError(f"cache file {where} has a damaged manifest: field {key!r} holds a value that is "
                                 "neither text nor a whole number; rebuild it")
    if not _valid_shapes(manifest["shapes"]):
        raise CacheFileError(f"cache file {where} has a damaged manifest: field 'shapes' must map k and v to lists "
                             "of shapes (or state to one shape), each a list of whole numbers; rebuild it")
    if engine_of(manifest) not in ENGINES:
        raise CacheFileError(f"cache file {where} was made by an engine this cag does not know "
                             f"({manifest['engine']!r}); rebuild it")
    bounds = manifest.get("prefill_bounds")
    if bounds is not None and not _valid_bounds(bounds, manifest["tokens"]):
        raise CacheFileError(f"cache file {where} has a damaged manifest: field 'prefill_bounds' must be rising "
                             "positions ending at the token count; rebuild it")
    return manifest


def _whole(value: object) -> bool:
    return type(value) is int  # not a bool, which JSON's true would pass as 1


def _valid_shapes(shapes: dict) -> bool:
    def shape(value: object) -> bool:
        return isinstance(value, list) and all(_whole(n) for n in value)

    return all((key in ("k", "v") and isinstance(value, list) and all(shape(s) for s in value))
               or (key == "state" and shape(value)) for key, value in shapes.items())


def _valid_bounds(bounds: list, tokens: int) -> bool:
    if not all(_whole(b) for b in bounds):
        return False
    return (not bounds and tokens == 0) or (bool(bounds) and bounds[-1] == tokens
                                            and all(a < b for a, b in zip([0, *bounds], bounds)))


IDENTITY = ("model", "tokenizer", "template", "knowledge")  # what a cache was made for (dicts of text)
# what a copy of a cache into another tier keeps from its manifest (the passage index, cag.kb.passages, is the
# knowledge base's and is checked where it is used: here only its type)
CARRIED = (*IDENTITY, "prefill_bounds", "engine", "passages")
_FIELDS = {"layers": (int,), "tokens": (int,), "dtype": (str,), "shapes": (dict,), "tensors_sha256": (str,),
           "checksum": (str,), "signature": (str,), "kv_quant": (str,), "created": (str,), "cag_version": (str,),
           "prefill_bounds": (list,), "engine": (str,), "passages": (dict,), **{key: (dict,) for key in IDENTITY}}
_OPTIONAL = {"checksum", "signature", "kv_quant", "created", "cag_version", "prefill_bounds", "engine", "passages",
             *IDENTITY}
ENGINES = ("torch", "llamacpp")


def load(path: str | Path, expect: Expect = Expect(), device: torch.device | str = "cpu",
         threads: int | None = None) -> Loaded:
    """Read and verify a cache file: integrity (checksum, signature) first, then what it was made for.

    The tensors land on `device` through cag.restore's pipeline (read, hash and copy in one pass, on
    `threads` threads; default: one per core up to 32) and are returned only once the digest matched."""
    with _open(path) as source:
        return _verified(str(path), source, expect, device, threads)


def load_bytes(data: bytes, expect: Expect = Expect(), device: torch.device | str = "cpu",
               where: str = "cache bytes", threads: int | None = None) -> Loaded:
    """The same checks as load(), on a cache file's bytes already in memory (e.g. fetched from Redis)."""
    return _verified(where, restore.BytesSource(data), expect, device, threads)


def _verified(where: str, source: restore.Source, expect: Expect, device, threads: int | None) -> Loaded:
    lay = restore.layout(source, where)
    manifest = _manifest(where, lay.metadata)
    key = signing_key()
    if key is not None:
        sig = manifest.get("signature")
        if not sig:
            raise CacheFileError(f"cache file {where} is not signed, but {SIGNING_KEY_ENV} is set; rebuild it")
        if not hmac.compare_digest(sig, _sign(manifest, key)):
            raise CacheFileError(f"cache file {where} has a bad signature: it was tampered with or signed with another key")
    tensors = restore.restore(source, lay, where, manifest.get("checksum"), manifest, manifest["tensors_sha256"],
                              device=device, host=HOST_TENSORS, threads=threads)
    wrong = mismatch(manifest, expect)
    if wrong is not None:
        raise CacheMismatchError(where, *wrong)
    if engine_of(manifest) != "torch":
        return Loaded(manifest=manifest, layers=[], prefix_ids=_state_ids(where, tensors, manifest),
                      state=tensors["state"])
    layers, prefix_ids = _unpack(where, tensors, manifest)
    return Loaded(manifest=manifest, layers=layers, prefix_ids=prefix_ids)


def mismatch(manifest: dict, expect: Expect) -> tuple[str, object, object] | None:
    """The first thing a cache was made for that differs from `expect`: (field, wanted, found), or None."""
    model = manifest.get("model", {})
    for field, want, have in (
        ("engine", expect.engine, engine_of(manifest)),
        ("model", expect.model, model.get("fingerprint")),
        ("llama.cpp version and build", expect.runtime, model.get("runtime")),
        ("context size", expect.context, model.get("context")),
        ("tokenizer", expect.tokenizer, manifest.get("tokenizer", {}).get("fingerprint")),
        ("prompt template", expect.template, manifest.get("template", {}).get("fingerprint")),
        ("knowledge", expect.knowledge, manifest.get("knowledge", {}).get("sha256")),
        ("dtype", expect.dtype, manifest.get("dtype")),
        ("KV storage type", expect.kv, kv_storage(manifest)),
    ):
        if want is not None and (type(want) is not type(have) or want != have):  # the text "8192" is not 8192
            return field, want, have
    return None


def signing_key() -> bytes | None:
    from ..settings import current

    return current().signing_key


def _tensors(layers: KV, prefix_ids: list[int], kv_quant: str | None = None) -> dict[str, torch.Tensor]:
    out = {"prefix_ids": torch.tensor(prefix_ids, dtype=torch.int64)}
    for i, (k, v) in enumerate(layers):
        for name, t in (("k", k), ("v", v)):
            t = t.detach().to("cpu").contiguous()
            if kv_quant == "int8":
                out[f"{name}.{i}"], out[f"{name}s.{i}"] = kvquant.quantize(t)
            else:
                out[f"{name}.{i}"] = t
    return out


def _state_ids(path: str, tensors: dict[str, torch.Tensor], manifest: dict) -> list[int]:
    """The prefix ids of a cache of engine state, after checking it holds just that state, as listed."""
    state = tensors.get("state")
    if set(tensors) != {"prefix_ids", "state"} or state.dtype != torch.uint8 or state.dim() != 1 \
            or manifest.get("shapes") != {"state": [state.numel()]} or manifest.get("layers") != 0:
        raise CacheFileError(f"cache file {path} does not hold the engine state its manifest lists; rebuild it")
    prefix_ids = tensors["prefix_ids"].tolist()
    if len(prefix_ids) != manifest.get("tokens"):
        raise CacheFileError(f"cache file {path} holds a different number of tokens than its manifest says; rebuild it")
    return prefix_ids


def _unpack(path: str, tensors: dict[str, torch.Tensor], manifest: dict) -> tuple[KV, list[int]]:
    n = manifest.get("layers")
    quant = manifest.get("kv_quant")
    names = ("k", "v", "ks", "vs") if quant else ("k", "v")
    expected = {"prefix_ids"} | {f"{kv}.{i}" for i in range(n or 0) for kv in names}
    if not isinstance(n, int) or set(tensors) != expected or quant not in (None, *kvquant.MODES):
        raise CacheFileError(f"cache file {path} does not hold the tensors its manifest lists; rebuild it")
    if quant:
        dtype = getattr(torch, str(manifest.get("dtype")), None)
        if not isinstance(dtype, torch.dtype):
            raise CacheFileError(f"cache file {path} names an unknown dtype {manifest.get('dtype')!r}; rebuild it")
        layers = [(kvquant.dequantize(tensors[f"k.{i}"], tensors[f"ks.{i}"], dtype),
                   kvquant.dequantize(tensors[f"v.{i}"], tensors[f"vs.{i}"], dtype)) for i in range(n)]
    else:
        layers = [(tensors[f"k.{i}"], tensors[f"v.{i}"]) for i in range(n)]
    shapes = manifest.get("shapes", {})
    if [list(k.shape) for k, _ in layers] != shapes.get("k") or [list(v.shape) for _, v in layers] != shapes.get("v"):
        raise CacheFileError(f"cache file {path} has tensor shapes that differ from its manifest; rebuild it")
    prefix_ids = tensors["prefix_ids"].tolist()
    tokens = manifest.get("tokens")
    if len(prefix_ids) != tokens or any(k.shape[-2] != tokens for k, _ in layers):
        raise CacheFileError(f"cache file {path} holds a different number of tokens than its manifest says; rebuild it")
    return layers, prefix_ids


def _checksum(tensors: dict[str, torch.Tensor], method: str | None = CHECKSUM, manifest: dict | None = None) -> str:
    """The digest of tensors in memory by `method` (cag.checksum): every tensor's name, dtype, shape and bytes.

    The "+manifest" methods also cover every manifest field (but the digest and the signature): a changed
    `created` or `model.path` fails the check like a changed byte. Without CAG_SIGNING_KEY that guards
    against corruption, not a forger, who can recompute it; a signature guards against both."""
    items = []
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        items.append((checksum.header(name, t.dtype, t.shape), t.reshape(-1).view(torch.uint8).numpy().data))
    return checksum.of_buffers(method, manifest, items)


def _sign(manifest: dict, key: bytes) -> str:
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return hmac.new(key, json.dumps(body, sort_keys=True).encode(), hashlib.sha256).hexdigest()

