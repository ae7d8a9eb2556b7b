"""cag's native kernels: C compiled on first use with the machine's compiler, called through ctypes.

Why build at first use rather than ship binaries: `-march=native` picks the widest SIMD this CPU has,
and a plain C ABI loaded with ctypes needs no Python headers or torch extension toolchain, so any
machine with `cc` builds it in about a second. The library is cached under CAG_HOME/native, keyed by
the source, the flags and the CPU. Without a compiler (or with CAG_NATIVE=0) cag runs the same model
on torch's float32 matmuls: slower decoding, nothing else changes.

torch is imported first on purpose: its wheel ships libgomp.so.1, and loading ours afterwards makes
the kernels share torch's OpenMP runtime and thread count instead of starting a second pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch  # noqa: F401 - see the module docstring (shared OpenMP runtime)

from .... import paths, settings

_HERE = Path(__file__).parent
SOURCES = (_HERE / "qmatmul.c", _HERE / "step.c")  # compiled together into one library
HEADERS = (_HERE / "qblocks.h",)
# -ffp-contract=off: the C arithmetic is exactly what is written (no silent fused multiply-adds), so
# elementwise pieces such as the rotary embedding round like torch's.
_BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-std=gnu11", "-ffp-contract=off")
_LOCK = threading.Lock()
_CACHE: dict[bool, "Kernels | str"] = {}


@dataclass(frozen=True)
class Kernels:
    """The loaded library and what it was built with."""

    path: Path
    flags: tuple[str, ...]
    avx512: bool
    q41_matmul: ctypes._CFuncPtr
    q80_matmul: ctypes._CFuncPtr
    step: ctypes._CFuncPtr  # cag_step (step.c): one decoding step of a whole Llama model for some rows

    @property
    def describe(self) -> str:
        simd = "AVX-512" if self.avx512 else "portable C"
        threads = "OpenMP" if "-fopenmp" in self.flags else "1 thread"
        return f"{simd}, {threads}"


def load(portable: bool = False) -> "Kernels | None":
    """The kernels, compiling them if needed; None when they cannot be built here (see `why_not`)."""
    with _LOCK:
        if portable not in _CACHE:
            try:
                _CACHE[portable] = _load(portable)
            except _Unavailable as err:
                _CACHE[portable] = str(err)
        found = _CACHE[portable]
    return found if isinstance(found, Kernels) else None


def why_not(portable: bool = False) -> str | None:
    """Why `load()` returned None (no compiler, build error, disabled), or None when it did not."""
    load(portable)
    found = _CACHE.get(portable)
    return found if isinstance(found, str) else None


class _Unavailable(Exception):
    pass


# The structures step.c's cag_step reads (same field order and types as its C typedefs).
MAT_F32, MAT_Q41, MAT_Q80 = 0, 1, 2


class Mat(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("rows", ctypes.c_int64), ("cols", ctypes.c_int64),
                ("data", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    _fields_ = [("in_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p)] + [
        (name, Mat) for name in ("q", "k", "v", "o", "gate", "up", "down")]


class Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in
                ("n_layers", "hidden", "inter", "heads", "kv_heads", "head_dim", "vocab")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("layers", ctypes.POINTER(Layer)),
        ("final_norm", ctypes.c_void_p), ("lm_head", Mat)]


class Shared(ctypes.Structure):
    """The shared prefix's per-layer key/value buffers (pointer arrays) and their positions per kv head."""

    _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("stride", ctypes.c_int64)]


class Row(ctypes.Structure):
    """One answer's token in a step: embedding and rotary rows, positions, its own per-layer buffers."""

    _fields_ = [("embedding", ctypes.c_void_p), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
                ("pos", ctypes.c_int64), ("shared", ctypes.c_int64), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
                ("cap", ctypes.c_int64)]


def _load(portable: bool) -> Kernels:
    env = settings.current()
    if not env.native:
        raise _Unavailable("native kernels disabled by CAG_NATIVE=0")
    compiler = env.compiler
    if not compiler:
        raise _Unavailable("no C compiler found (install gcc, or set CC)")
    errors = []
    for flags in _flag_sets(portable):
        path = _library_path(compiler, flags)
        if not path.is_file():
            try:
                _compile(compiler, flags, path)
            except _Unavailable as err:
                errors.append(str(err))
                continue
        return _bind(path, flags)
    raise _Unavailable("; ".join(errors))


def _flag_sets(portable: bool) -> list[tuple[str, ...]]:
    """Best first: native SIMD with OpenMP, then without -march=native, then single-threaded."""
    extra = ("-DCAG_PORTABLE",) if portable else ()
    return [(*_BASE_FLAGS, *extra, "-march=native", "-fopenmp"), (*_BASE_FLAGS, *extra, "-fopenmp"),
            (*_BASE_FLAGS, *extra)]


def _library_path(compiler: str, flags: tuple[str, ...]) -> Path:
    h = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        h.update(source.read_bytes())
    h.update(" ".join((compiler, *flags)).encode())
    h.update(_cpu_identity().encode())
    return paths.home() / "native" / f"qmatmul-{h.hexdigest()[:16]}.so"


def _cpu_identity() -> str:
    """-march=native code must not run on another CPU (a shared CAG_HOME): key the build by its flags."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _compile(compiler: str, flags: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no output"])[0]
            raise _Unavailable(f"{compiler} {' '.join(flags)} failed: {first}")
        os.replace(tmp, target)  # atomic: a concurrent process sees the old file or the complete new one
    except (OSError, subprocess.SubprocessError) as err:
        raise _Unavailable(f"could not run {compiler}: {err}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bind(path: Path, flags: tuple[str, ...]) -> Kernels:
    try:
        lib = ctypes.CDLL(str(path))  # CDLL releases the GIL during calls, so server threads run in parallel
    except OSError as err:
        raise _Unavailable(f"could not load {path}: {err}") from None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for name in ("cag_q41_matmul", "cag_q80_matmul"):
        fn = getattr(lib, name)
        fn.argtypes = [p, i64, i64, p, i64, p]
        fn.restype = None
    lib.cag_qmatmul_avx512.restype = ctypes.c_int
    lib.cag_step.argtypes = [ctypes.POINTER(Model), ctypes.POINTER(Shared), ctypes.POINTER(Row), i64, p]
    lib.cag_step.restype = ctypes.c_int
    return Kernels(path=path, flags=flags, avx512=bool(lib.cag_qmatmul_avx512()),
                   q41_matmul=lib.cag_q41_matmul, q80_matmul=lib.cag_q80_matmul, step=lib.cag_step)
