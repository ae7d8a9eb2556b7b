"""Every call into llama-cpp-python's low-level API lives here, because that API moves between releases.

cag drives llama.cpp through `llama_cpp.llama_cpp` (ctypes over libllama) rather than the `Llama` class:
it needs several sequences sharing one KV cache (`llama_memory_seq_cp`), a sequence's state as bytes
(`llama_state_seq_get_data` / `_set_data`) and batches it composes itself. The wrappers below own the
C objects (model, context, batch) and free them; everything above speaks Python.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import threading
from pathlib import Path

import numpy as np

from ...errors import ModelError
from ..cores import Cores

INSTALL = ('pip install "llama-cpp-python==0.3.36" (it builds llama.cpp from source: about 12 minutes on 2 '
           "cores, once; in a cag checkout `bash scripts/setup-llamacpp.sh` builds it for this CPU and keeps "
           "the wheel)")
VERSION = "0.3.36"  # the llama-cpp-python release cag is tested with
# Keys and values both f16: llama.cpp's CPU attention takes batch-dependent shortcuts (engine.py pads around
# them). bf16 and q8_0 take none, so their one-row steps need no padding row, but without the tiled path
# their prefill is far slower (bench/engines.py: 2x at 1.5k tokens, 4.5x at 8k): f16 is the default.
SHORTCUT_KV = ("f16",)
GGML_TYPE_BF16 = 30  # ggml.h's enum ggml_type (llama-cpp-python 0.3.36 names F16 and Q8_0 but not BF16)

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def api():
    """llama_cpp.llama_cpp, imported and initialised once; ModelError with the install line when missing."""
    with _LOCK:
        if "api" not in _STATE:
            try:
                import llama_cpp
                from llama_cpp import llama_cpp as low
            except ImportError as err:
                raise ModelError(f"GGUF models run through llama.cpp, which is not installed here ({err.name or err}); "
                                 f"{INSTALL}") from None
            low.llama_backend_init()
            low.llama_log_set(_QUIET, None)
            _STATE["api"], _STATE["version"] = low, llama_cpp.__version__
        return _STATE["api"]


_HEARD: list[str] | None = None  # llama.cpp's log lines while a context is made (Context._made), else None
_MAKING = threading.Lock()  # one context made at a time: the lines heard are that context's
_BUFFER = re.compile(r"buffer size =\s*([0-9.]+) MiB")


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _QUIET(level, text, data):  # noqa: N802 - llama.cpp's log callback: cag reports errors itself
    heard = _HEARD
    if heard is not None and text:
        heard.append(text.decode("utf-8", "replace"))


def _listening(call):
    """(call(), the lines llama.cpp logged meanwhile): one call listened to at a time, so the lines are its."""
    global _HEARD
    with _MAKING:
        _HEARD = heard = []
        try:
            return call(), heard
        finally:
            _HEARD = None


def _unloadable(path: Path, heard: list[str]) -> str:
    """Why llama.cpp refused a GGUF file, in words a user can act on: a file cut short or damaged (download or
    copy it again) differs from a whole file this llama.cpp cannot run (a newer architecture or type)."""
    reasons = [m[1] for line in heard if (m := re.search(r"error loading model:\s*(.+)", line))]
    said = (reasons or [line for line in heard if re.search(r"error|invalid|unknown", line, re.I)] or [""])[0].strip()
    said = f" (llama.cpp: {said[:300]})" if said else ""
    size = path.stat().st_size if path.exists() else 0
    if re.search(r"not within the file bounds|corrupted or incomplete|truncat|unexpected end|failed to read", said,
                 re.I):
        return (f"{path} is cut short or damaged ({size} bytes){said}: download or copy the model again")
    arch = re.search(r"unknown (?:model )?architecture: '?([\w.-]+)", said)
    if arch:
        return (f"{path} is a {arch[1]} model, which {build_id()} cannot run{said}: use a model of an "
                "architecture it knows, or a newer llama-cpp-python (`cag version` names the one installed)")
    return (f"llama.cpp ({build_id()}) could not load {path} ({size} bytes){said}: the file may be damaged (copy it "
            "again) or of an architecture or type this llama.cpp does not know (`cag version` names it)")


def version() -> str:
    api()
    return str(_STATE["version"])


def build_id() -> str:
    """llama-cpp-python's version and a digest of the llama.cpp libraries it loads: a cache's state bytes
    are only read back by the build that wrote them (the state format and the kernels' rounding follow it)."""
    with _LOCK:
        found = _STATE.get("build")
    if found is None:
        import llama_cpp

        from ..files import file_sha256

        libs = sorted(p for p in (Path(llama_cpp.__file__).parent / "lib").glob("*.so*") if not p.is_symlink())
        digest = hashlib.sha256("".join(file_sha256(p) for p in libs).encode()).hexdigest()[:16]
        found = f"llama-cpp-python {version()}, libraries {digest}"
        with _LOCK:
            _STATE["build"] = found
    return str(found)


class Model:
    """A GGUF file loaded by llama.cpp, memory-mapped; weights stay in their quantization."""

    def __init__(self, path: Path):
        L = api()
        params = L.llama_model_default_params()
        params.load_mode = L.LLAMA_LOAD_MODE_MMAP
        params.n_gpu_layers = 0
        # No repacked or AMX weight copies: their kernels compute a token's matmuls differently for one
        # token and for several, and an answer must be the same bits alone or batched (and AMX tile
        # instructions fault on some virtual machines that list them).
        params.use_extra_bufts = False
        self.ptr, heard = _listening(lambda: L.llama_model_load_from_file(str(path).encode(), params))
        if not self.ptr:
            raise ModelError(_unloadable(path, heard))
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = L.llama_model_n_ctx_train(self.ptr)
        self.nbytes = int(L.llama_model_size(self.ptr))
        self.contexts = 0  # contexts alive on the model: it is freed after the last of them
        self.closing = False
        self._lock = threading.Lock()

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = api().llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def chat_template(self) -> str | None:
        found = api().llama_model_chat_template(self.ptr, None)
        return found.decode("utf-8") if found else None

    def token_text(self, token: int) -> str:
        return (api().llama_vocab_get_text(self.vocab, token) or b"").decode("utf-8", "replace")

    def token_attr(self, token: int) -> int:
        return int(api().llama_vocab_get_attr(self.vocab, token))

    def is_eog(self, token: int) -> bool:
        return bool(api().llama_vocab_is_eog(self.vocab, token))

    def bos_eos(self) -> tuple[int, int]:
        L = api()
        return int(L.llama_vocab_bos(self.vocab)), int(L.llama_vocab_eos(self.vocab))

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """Ids of `text`; special-token parsing always off (user text never becomes control tokens)."""
        L = api()
        data = text.encode("utf-8", "surrogatepass")
        n = len(data) + 8
        while True:
            out = (ctypes.c_int32 * n)()
            got = L.llama_tokenize(self.vocab, data, len(data), out, n, add_special, False)
            if got >= 0:
                return list(out[:got])
            n = -got

    def piece(self, token: int) -> bytes:
        """The bytes token `token` stands for (control tokens: none)."""
        L = api()
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def kv_bytes(self, cells: int, kv_type: str) -> int:
        """Bytes of keys and values for `cells` cells of every layer, from the file's attention shape."""
        L = api()
        arch = self.meta("general.architecture") or ""
        heads = max(1, int(L.llama_model_n_head(self.ptr)))
        kv_heads = int(L.llama_model_n_head_kv(self.ptr))
        key = int(self.meta(f"{arch}.attention.key_length") or int(L.llama_model_n_embd(self.ptr)) // heads)
        value = int(self.meta(f"{arch}.attention.value_length") or key)
        per = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}[kv_type]
        return int(cells * int(L.llama_model_n_layer(self.ptr)) * kv_heads * (key + value) * per)

    def close(self) -> None:
        """Free the model, or, while contexts made on it are alive, once the last of them is closed."""
        with self._lock:
            self.closing = True
            if self.ptr and not self.contexts:
                api().llama_model_free(self.ptr)
                self.ptr = None

    def adopt(self, delta: int) -> None:
        """A context was made on the model (+1) or closed (-1)."""
        with self._lock:
            self.contexts += delta
        if self.closing and not self.contexts:
            self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


ATTR_CONTROL, ATTR_USER_DEFINED = 1 << 3, 1 << 4  # llama_token_attr bits


class Context:
    """A llama.cpp context: one KV cache shared by up to `sequences` sequences (unified: a copy of a
    sequence's positions into another shares its cells, it does not copy them), flash attention on."""

    def __init__(self, model: Model, cells: int, threads: int, kv_type: str, sequences: int, batch: int = 512,
                 cores: Cores | None = None):
        """`threads` at most; with `cores`, each decode takes as many as other work leaves idle (Cores)."""
        L = api()
        self.threads, self.cores = threads, cores
        params = L.llama_context_default_params()
        params.n_ctx = cells
        params.n_batch = params.n_ubatch = batch
        params.n_seq_max = sequences
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.kv_unified = True
        params.swa_full = True  # sliding-window layers keep every cell: a sequence's state is whole
        types = {"f16": L.GGML_TYPE_F16, "bf16": GGML_TYPE_BF16, "q8_0": L.GGML_TYPE_Q8_0}
        params.type_k = params.type_v = types[kv_type]
        params.no_perf = True
        self.model = model
        self.ptr, self.nbytes = self._made(params)
        if not self.ptr:
            raise ModelError(f"llama.cpp could not make a context of {cells} cells for this model (out of memory?)")
        model.adopt(+1)
        self.mem = L.llama_get_memory(self.ptr)
        self.cells = int(L.llama_n_ctx(self.ptr))
        if not self.nbytes:  # no buffer sizes heard (another llama.cpp's log lines): at least the KV cells
            self.nbytes = model.kv_bytes(self.cells, kv_type)

    def _made(self, params) -> tuple[object, int]:
        """The new context and the bytes of the buffers llama.cpp allocated for it (KV cells, outputs, compute
        graph), as its log reports them while making it: what a loaded knowledge base holds beyond the model."""
        ptr, heard = _listening(lambda: api().llama_init_from_model(self.model.ptr, params))
        return ptr, int(sum(float(m[1]) for line in heard if (m := _BUFFER.search(line))) * (1 << 20))

    def _live(self) -> None:
        if not self.ptr:
            raise ModelError("this knowledge base's llama.cpp context was closed (it was unloaded); ask again")

    def decode(self, tokens: list[int], positions: list[int], seqs: list[int], outputs: list[bool]) -> np.ndarray:
        """Run the tokens (each at its position in its sequence); logits [outputs, vocab] of those flagged."""
        self._live()
        L = api()
        n = len(tokens)
        b = L.llama_batch_init(n, 0, 1)
        try:
            b.n_tokens = n
            for i in range(n):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tokens[i], positions[i], 1, outputs[i]
                b.seq_id[i][0] = seqs[i]
            self._threads_now()
            rc = L.llama_decode(self.ptr, b)
            if rc != 0:
                raise ModelError(f"llama.cpp could not run {n} tokens (llama_decode returned {rc}: "
                                 f"{'no room left in the KV cache' if rc == 1 else 'an internal error'})")
            rows = [i for i in range(n) if outputs[i]]
            out = np.empty((len(rows), self.model.n_vocab), dtype=np.float32)
            for j, i in enumerate(rows):
                out[j] = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ptr, i), shape=(self.model.n_vocab,))
            return out
        finally:
            L.llama_batch_free(b)

    def _threads_now(self) -> None:
        if self.cores is not None:
            n = self.cores.threads()
            if n != self.threads:
                api().llama_set_n_threads(self.ptr, n, n)
                self.threads = n

    def copy(self, src: int, dst: int, end: int, start: int = 0) -> None:
        """Sequence `dst` also holds positions [start, end) of `src` (the same cells: nothing is copied)."""
        self._live()
        api().llama_memory_seq_cp(self.mem, src, dst, start, end)

    def remove(self, seq: int, start: int = -1, end: int = -1) -> None:
        if self.ptr:  # a closed context holds no cells
            api().llama_memory_seq_rm(self.mem, seq, start, end)

    def last_position(self, seq: int) -> int:
        self._live()
        return int(api().llama_memory_seq_pos_max(self.mem, seq))

    def state(self, seq: int) -> bytes:
        self._live()
        L = api()
        size = L.llama_state_seq_get_size(self.ptr, seq)
        buf = (ctypes.c_ubyte * size)()
        got = L.llama_state_seq_get_data(self.ptr, buf, size, seq)
        if got != size:
            raise ModelError(f"llama.cpp wrote {got} of {size} bytes of a sequence's state")
        return bytes(buf)

    def set_state(self, data: bytes | memoryview, seq: int) -> bool:
        self._live()
        L = api()
        buf = (ctypes.c_ubyte * len(data)).from_buffer_copy(data)
        return L.llama_state_seq_set_data(self.ptr, buf, len(data), seq) == len(data)

    def close(self) -> None:
        if self.ptr:
            api().llama_free(self.ptr)
            self.ptr = None
            self.model.adopt(-1)

    def __del__(self):  # a context nobody holds any more (a knowledge base let go without release())
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
