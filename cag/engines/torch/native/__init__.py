"""cag's native kernels: C compiled on first use with the machine's compiler, called through ctypes.

Why build at first use rather than ship binaries: the build can use the SIMD instructions this CPU has,
and a plain C ABI loaded with ctypes needs no Python headers or torch extension toolchain, so any
machine with `cc` builds it in a few seconds. The library is cached under CAG_HOME/native, keyed by
the sources, the flags (the kernel set among them) and the CPU. Without a compiler (or with
CAG_NATIVE=0) cag runs the same model on torch's float32 matmuls: slower decoding, nothing else changes.

Kernel sets (kernels.h, arch-fallback.h): "avx512" (x86/avx512.c), "avx2" (x86/avx2.c: AVX2+FMA+F16C),
"neon" (arm/neon.c, AArch64) and "portable" (generic.c alone). CAG_SIMD picks one; "auto", the default,
takes the best this CPU runs, which the compiler reports (its predefined macros for -march=native).
A set the CPU lacks is refused rather than built: its code would stop the process on the first
unknown instruction.

Threads: torch is imported first on purpose: its wheel ships libgomp.so.1, and loading ours afterwards
makes the kernels share torch's OpenMP runtime instead of starting a second pool of threads. OpenMP's
thread count is per calling thread, though (torch.set_num_threads sets it only in the thread that
calls it), so every call passes torch.get_num_threads() explicitly: the kernels run on torch's thread
count in any thread, a server's worker threads included.
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

import torch  # first: see the module docstring (one OpenMP runtime)

from .... import paths, settings

_HERE = Path(__file__).parent
COMMON = (_HERE / "generic.c", _HERE / "qmatmul.c", _HERE / "step.c")  # in every build, with the set's file


@dataclass(frozen=True)
class KernelSet:
    """One kernel set: its source file, the instruction-set flags it is built with, and the compiler
    macros (for -march=native) that say this CPU runs it."""

    name: str
    source: Path | None
    isa_flags: tuple[str, ...]
    needs: tuple[str, ...]
    tune: tuple[str, ...]  # tuning for this CPU (no new instructions), dropped if the compiler refuses it


SETS = {  # best first
    "avx512": KernelSet("avx512", _HERE / "x86" / "avx512.c", ("-mavx512f", "-mavx2", "-mfma", "-mf16c"),
                        ("__AVX512F__", "__AVX2__", "__FMA__", "__F16C__"), ("-mtune=native",)),
    "avx2": KernelSet("avx2", _HERE / "x86" / "avx2.c", ("-mavx2", "-mfma", "-mf16c"),
                      ("__AVX2__", "__FMA__", "__F16C__"), ("-mtune=native",)),
    "neon": KernelSet("neon", _HERE / "arm" / "neon.c", (), ("__aarch64__", "__ARM_NEON"), ("-mcpu=native",)),
    # generic C only; -march=native lets the compiler vectorize it for this CPU (the same results: it may not
    # reorder a float sum, and -ffp-contract=off keeps it from fusing)
    "portable": KernelSet("portable", None, (), (), ("-march=native",)),
}
CHOICES = settings.SIMD_CHOICES  # "auto" and the keys of SETS

# -ffp-contract=off: the C arithmetic is exactly what is written (no silent fused multiply-adds), so
# elementwise pieces such as the rotary embedding round like torch's.
_BASE_FLAGS = ("-O3", "-std=gnu11", "-ffp-contract=off")
_LOCK = threading.Lock()
_CACHE: dict[str, "Kernels | str"] = {}
_CPU: dict[str, tuple[str, ...]] = {}


@dataclass(frozen=True)
class Kernels:
    """The loaded library, what it was built with, and its entry points on torch's thread count."""

    path: Path
    flags: tuple[str, ...]
    simd: str  # the kernel set: a key of SETS
    lib: ctypes.CDLL

    @property
    def describe(self) -> str:
        threads = "OpenMP" if "-fopenmp" in self.flags else "1 thread"
        return f"{self.lib.cag_kernel_set().decode()}, {threads}"

    def q41_matmul(self, x: int, m: int, k: int, w: int, n: int, y: int) -> None:
        """y[m,n] = x[m,k] @ W^T for Q4_1 blocks W (pointers as ints)."""
        self.lib.cag_q41_matmul(x, m, k, w, n, y, torch.get_num_threads())

    def q80_matmul(self, x: int, m: int, k: int, w: int, n: int, y: int) -> None:
        """y[m,n] = x[m,k] @ W^T for Q8_0 blocks W (pointers as ints)."""
        self.lib.cag_q80_matmul(x, m, k, w, n, y, torch.get_num_threads())

    def step(self, model, shared, rows, count: int, logits: int) -> int:
        """cag_step (step.c): one decoding step of a whole model for `count` rows. The number of threads it
        ran on, or -1 when out of memory."""
        return self.lib.cag_step(model, shared, rows, count, logits, torch.get_num_threads())


def load(simd: str | None = None) -> "Kernels | None":
    """The kernels of kernel set `simd` (None: the CAG_SIMD setting; "auto": the best this CPU runs),
    compiling them if needed; None when they cannot be built or run here (see `why_not`)."""
    requested = simd or settings.current().simd
    if requested not in CHOICES:
        raise ValueError(f"unknown kernel set {requested!r}: one of {', '.join(CHOICES)}")
    with _LOCK:
        if requested not in _CACHE:
            try:
                _CACHE[requested] = _load(requested)
            except _Unavailable as err:
                _CACHE[requested] = str(err)
        found = _CACHE[requested]
    return found if isinstance(found, Kernels) else None


def why_not(simd: str | None = None) -> str | None:
    """Why `load(simd)` returned None (no compiler, a set this CPU lacks, build error, disabled), or None."""
    load(simd)
    found = _CACHE.get(simd or settings.current().simd)
    return found if isinstance(found, str) else None


def cpu_sets() -> tuple[str, ...]:
    """The kernel sets this CPU runs, best first ("portable" always; nothing without a compiler)."""
    compiler = settings.current().compiler
    return _cpu_sets(compiler) if compiler else ()


def sources(simd: str) -> tuple[Path, ...]:
    """The C files of a build of kernel set `simd` (generic.c, qmatmul.c, step.c and the set's own file)."""
    own = SETS[simd].source
    return (*COMMON, own) if own else COMMON


def flags(simd: str, openmp: bool = True) -> tuple[str, ...]:
    """The compiler flags of a build of kernel set `simd`, untuned (for the library: add -shared -fPIC)."""
    return (*_BASE_FLAGS, f"-DCAG_SIMD_{simd.upper()}", *SETS[simd].isa_flags, *(("-fopenmp",) if openmp else ()))


class _Unavailable(Exception):
    pass


# The structures cag_step reads (step.h: same field order and types).
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


def _load(requested: str) -> Kernels:
    env = settings.current()
    if not env.native:
        raise _Unavailable("native kernels disabled by CAG_NATIVE=0")
    compiler = env.compiler
    if not compiler:
        raise _Unavailable("no C compiler found (install gcc, or set CC)")
    runs = _cpu_sets(compiler)
    name = runs[0] if requested == "auto" else requested
    if name not in runs:
        raise _Unavailable(f"CAG_SIMD={name}, but this CPU does not run the {name} kernels "
                           f"(it runs: {', '.join(runs)})")
    if name in _CACHE:  # "auto" and its set by name share one library
        return _loaded(_CACHE[name])
    errors = []
    for build in _flag_sets(name):
        path = _library_path(compiler, build)
        if not path.is_file():
            try:
                _compile(compiler, build, sources(name), path)
            except _Unavailable as err:
                errors.append(str(err))
                continue
        _CACHE[name] = _bind(path, build, name)
        return _CACHE[name]
    raise _Unavailable("; ".join(errors))


def _loaded(found: "Kernels | str") -> Kernels:
    if isinstance(found, str):
        raise _Unavailable(found)
    return found


def _flag_sets(simd: str) -> list[tuple[str, ...]]:
    """Best first: tuned for this CPU with OpenMP, then untuned, then single-threaded."""
    library = ("-shared", "-fPIC")
    return [(*flags(simd), *SETS[simd].tune, *library), (*flags(simd), *library),
            (*flags(simd, openmp=False), *library)]


def _cpu_sets(compiler: str) -> tuple[str, ...]:
    """What the compiler says this CPU has (its macros for -march=native), as kernel sets, best first."""
    if compiler not in _CPU:
        macros: set[str] = set()
        for target in (("-march=native",), ("-mcpu=native",), ()):
            try:
                done = subprocess.run([compiler, *target, "-dM", "-E", "-x", "c", os.devnull], capture_output=True,
                                      text=True, timeout=60)
            except (OSError, subprocess.SubprocessError):
                break
            if done.returncode == 0:
                macros = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("#define ")}
                break
        _CPU[compiler] = tuple(name for name, s in SETS.items() if all(m in macros for m in s.needs))
    return _CPU[compiler]


def _library_path(compiler: str, build: tuple[str, ...]) -> Path:
    h = hashlib.sha256()
    for source in sorted(_HERE.rglob("*.[ch]")):  # every kernel source, whichever set this build is
        h.update(source.read_bytes())
    h.update(" ".join((compiler, *build)).encode())
    h.update(_cpu_identity().encode())
    return paths.home() / "native" / f"qmatmul-{h.hexdigest()[:16]}.so"


def _cpu_identity() -> str:
    """Code tuned with -march=native must not run on another CPU (a shared CAG_HOME): key the build by it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _compile(compiler: str, build: tuple[str, ...], files: tuple[Path, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *build, *map(str, files), "-o", tmp, "-lm"], capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no output"])[0]
            raise _Unavailable(f"{compiler} {' '.join(build)} failed: {first}")
        os.replace(tmp, target)  # atomic: a concurrent process sees the old file or the complete new one
    except (OSError, subprocess.SubprocessError) as err:
        raise _Unavailable(f"could not run {compiler}: {err}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bind(path: Path, build: tuple[str, ...], name: str) -> Kernels:
    try:
        lib = ctypes.CDLL(str(path))  # CDLL releases the GIL during calls, so server threads run in parallel
    except OSError as err:
        raise _Unavailable(f"could not load {path}: {err}") from None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for fn_name in ("cag_q41_matmul", "cag_q80_matmul"):
        fn = getattr(lib, fn_name)
        fn.argtypes = [p, i64, i64, p, i64, p, i32]
        fn.restype = None
    lib.cag_step.argtypes = [ctypes.POINTER(Model), ctypes.POINTER(Shared), ctypes.POINTER(Row), i64, p, i32]
    lib.cag_step.restype = i32
    lib.cag_step_matvec.argtypes = [ctypes.POINTER(Mat), p, i64, p, i32]
    lib.cag_step_matvec.restype = None
    lib.cag_kernel_set.restype = ctypes.c_char_p
    lib.cag_openmp_threads.restype = i32
    return Kernels(path=path, flags=build, simd=name, lib=lib)
