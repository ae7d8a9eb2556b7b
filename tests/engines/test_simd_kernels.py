"""cag's CPU kernel sets (cag/engines/torch/native): every SIMD set against portable C, one dot product per
block format shared by the packed matmul and the C step, rows and thread counts that never change a row's
bits, the thread count torch sets, the CAG_SIMD setting, and NEON run under qemu.

Every set this CPU runs is tested here, whatever the machine: an AVX-512 machine tests its AVX2 set too
(the build passes -mavx2 -mfma -mf16c and nothing wider). A set the CPU lacks is skipped, never failed.
tests/kernel_check.c checks the kernels one by one against their portable twins inside one program; it is
also what runs the NEON set, cross-compiled for AArch64, under qemu.
"""

from __future__ import annotations

import ctypes
import random
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cag import settings
from cag.engines.torch import fastdecode, kvcompat, models, native, nativestep, packed
from cag.engines.torch.native.harness import Decoding, prefill
from cag.errors import CagError
from conftest import ggml_q41, ggml_q80, require_native

X86_SETS = ["avx512", "avx2"]
CHECK = Path(__file__).resolve().parents[1] / "kernel_check.c"
KERNELS = ("dots_q41", "dots_q80", "dots_f32", "rmsnorm", "silu_mul", "scores", "max", "exp_sum", "weighted_sum")
# a random 2-layer model for kernel_check's `step`: layers hidden inter heads kv_heads head_dim vocab prefix rows steps
RANDOM_MODEL = ("2", "64", "128", "4", "2", "16", "300", "300", "3", "6")
TOLERANCE = fastdecode.TOLERANCE / 10  # what each set must meet against portable C: a wide margin under the check's


@pytest.fixture(params=list(native.SETS))
def kernels(request):
    """Each kernel set in turn (skipped where this CPU does not run it)."""
    return require_native(request.param)


# ---- tests/kernel_check.c: the kernels one by one, and a random model, per set ---------------------------

def _build_check(simd: str, out: Path, compiler: str | None = None) -> Path:
    """kernel_check.c linked with the kernels of `simd`, compiled as the library is (without its CPU tuning)."""
    compiler = compiler or settings.current().compiler
    exe = out / f"kernel_check-{simd}"
    command = [compiler, *native.flags(simd), f"-I{native.COMMON[0].parent}", *map(str, native.sources(simd)),
               str(CHECK), "-o", str(exe), "-lm"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return exe


def _run(exe: Path, *args: str, runner: tuple[str, ...] = ()) -> str:
    done = subprocess.run([*runner, str(exe), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _logits(out: str) -> torch.Tensor:
    lines = out.split()
    assert lines[0] == "logits" and len(lines) == 2 + int(lines[1])
    return torch.tensor([float.fromhex(v) for v in lines[2:]])


def _checked_kernels(out: str) -> set[str]:
    return {line.split()[1] for line in out.splitlines() if line.startswith("ok ")}


@pytest.mark.parametrize("simd", [*X86_SETS, "portable"])
def test_each_kernel_matches_portable_c_and_rows_do_not_depend_on_their_batch(simd, tmp_path):
    require_native(simd)
    out = _run(_build_check(simd, tmp_path), "kernels")
    assert _checked_kernels(out) == set(KERNELS)


@pytest.mark.parametrize("simd", X86_SETS)
def test_a_random_model_decodes_like_portable_c_and_rows_alone_equal_rows_in_company(simd, tmp_path):
    """kernel_check `step` fails by itself if row 0's logits alone on 1 thread differ by one bit from row 0
    beside two other rows on 2 threads; here its logits are also held against the portable set's."""
    require_native(simd)
    got = _logits(_run(_build_check(simd, tmp_path), "step", *RANDOM_MODEL))
    want = _logits(_run(_build_check("portable", tmp_path), "step", *RANDOM_MODEL))
    assert fastdecode.close(got, want, TOLERANCE) and not torch.equal(got, want)  # another order, same model


def _aarch64_tools() -> tuple[str, str]:
    compiler, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if not (compiler and qemu and Path("/usr/aarch64-linux-gnu").is_dir()):
        pytest.skip("NEON is tested under qemu: install qemu-user and gcc-aarch64-linux-gnu (scripts/setup.sh does)")
    return compiler, qemu


def test_neon_kernels_under_qemu_match_portable_c(tmp_path):
    compiler, qemu = _aarch64_tools()
    runner = (qemu, "-L", "/usr/aarch64-linux-gnu")
    neon = _build_check("neon", tmp_path, compiler)
    out = _run(neon, "kernels", runner=runner)
    assert out.startswith("kernel set: NEON") and _checked_kernels(out) == set(KERNELS)
    got = _logits(_run(neon, "step", *RANDOM_MODEL, runner=runner))  # rows alone == in company, 1 vs 2 threads
    want = _logits(_run(_build_check("portable", tmp_path, compiler), "step", *RANDOM_MODEL, runner=runner))
    assert fastdecode.close(got, want, TOLERANCE) and not torch.equal(got, want)


# ---- one dot product per block format, from the matmul and from the step ----------------------------------

@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_packed_matmul_and_the_steps_matvec_give_the_same_bits(kernels, kind):
    torch.manual_seed(5)
    quant, pack = (ggml_q41, packed.pack_q41) if kind == "q4_1" else (ggml_q80, packed.pack_q80)
    w = quant(torch.randn(200, 576))
    blocks = pack(w)
    x = torch.randn(7, 576)
    mat = native.Mat(kind=native.MAT_Q41 if kind == "q4_1" else native.MAT_Q80, rows=200, cols=576,
                     data=blocks.data_ptr())
    matmul = torch.empty(7, 200)
    (kernels.q41_matmul if kind == "q4_1" else kernels.q80_matmul)(x.data_ptr(), 7, 576, blocks.data_ptr(), 200,
                                                                   matmul.data_ptr())
    torch.testing.assert_close(matmul, F.linear(x, w), rtol=1e-4, atol=1e-4)  # K = 576: sums of ~25
    for threads in (1, 2, 3):
        for rows in (1, 3, 7):
            step = torch.empty(rows, 200)
            kernels.lib.cag_step_matvec(ctypes.byref(mat), x.data_ptr(), rows, step.data_ptr(), threads)
            assert torch.equal(step, matmul[:rows]), (threads, rows)


# ---- the whole C step on a tiny model: each set against portable C and transformers -------------------------

def _prompt(vocab: int, n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def _against_transformers(model, kernel_sets, prompt: list[int], steps: int):
    """Greedy decoding through transformers' forward over a DynamicCache of the prompt, and through the C step
    of each kernel set fed the same tokens: (transformers' logits and keys, [each set's logits and keys])."""
    prefix = prefill(model, prompt)
    cache = kvcompat.from_layers([(k.clone(), v.clone()) for k, v in prefix])  # transformers appends to copies
    runs = [Decoding(nativestep.Plan(model, k), prefix, rows=1, room=steps) for k in kernel_sets]
    want, got, token = [], [[] for _ in runs], prompt[-1]
    with torch.inference_mode():
        for _ in range(steps):
            want.append(kvcompat.forward(model, torch.tensor([[token]]), cache)[0])
            for run, out in zip(runs, got):
                out.append(run.step([token])[0])
            token = int(torch.argmax(want[-1]))
    keys = [k[0, :, len(prompt):] for k, _ in kvcompat.to_layers(cache)]
    return (want, keys), [(out, run.keys(0)) for run, out in zip(runs, got)]


@pytest.mark.parametrize("simd", X86_SETS)
def test_c_step_of_each_set_agrees_with_portable_c_and_transformers(simd, q4_model_dir):
    fast, portable = require_native(simd), require_native("portable")
    lm = models.load(str(q4_model_dir), device="cpu", dtype="float32")
    (want, want_keys), runs = _against_transformers(lm.model, [fast, portable], _prompt(lm.config.vocab_size, 300), 10)
    (logits, keys), (portable_logits, _) = runs
    for w, g, p in zip(want, logits, portable_logits):
        assert fastdecode.close(g, w, TOLERANCE) and fastdecode.close(g, p, TOLERANCE)
        assert int(torch.argmax(g)) == int(torch.argmax(w))
    assert all(fastdecode.close(k, w, TOLERANCE) for k, w in zip(keys, want_keys))


@pytest.mark.parametrize("simd", X86_SETS)
def test_c_step_agrees_with_transformers_on_the_default_model(simd, real_lm):
    kernels = require_native(simd)
    (want, want_keys), [(got, keys)] = _against_transformers(real_lm.model, [kernels],
                                                             _prompt(real_lm.config.vocab_size, 300), 4)
    for w, g in zip(want, got):
        assert fastdecode.close(g, w, TOLERANCE) and int(torch.argmax(g)) == int(torch.argmax(w))
    assert all(fastdecode.close(k, w, TOLERANCE) for k, w in zip(keys, want_keys))


def test_a_rows_bits_do_not_depend_on_its_company_or_the_thread_count(kernels, q4_model_dir):
    lm = models.load(str(q4_model_dir), device="cpu", dtype="float32")
    plan = nativestep.Plan(lm.model, kernels)
    prefix = prefill(lm.model, _prompt(lm.config.vocab_size, 260, seed=1))
    runs = []
    for threads, company in ((1, 0), (2, 0), (3, 0), (2, 3), (1, 6)):
        decoding = Decoding(plan, prefix, rows=1 + company, room=4)
        run = []
        for token in (11, 12, 13, 14):  # row 0 decodes 11..14; the others other tokens beside it
            run.append(decoding.step([token] + [100 + i for i in range(company)], threads=threads)[0])
            assert decoding.team == threads
        runs.append(run)
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))


# ---- threads --------------------------------------------------------------------------------------------

def test_the_kernels_run_on_torchs_thread_count_in_any_thread(q4_model_dir):
    kernels = require_native()
    if "-fopenmp" not in kernels.flags:
        pytest.skip("the kernels were built without OpenMP (one thread)")
    lm = models.load(str(q4_model_dir), device="cpu", dtype="float32")
    decoding = Decoding(nativestep.Plan(lm.model, kernels), prefill(lm.model, [5, 6, 7]), rows=1, room=3)
    seen = []

    def decode_one() -> None:
        decoding.step([9])
        seen.append(decoding.team)

    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            # one OpenMP runtime: the library sees what torch.set_num_threads set in this thread
            assert kernels.lib.cag_openmp_threads() == n
            worker = threading.Thread(target=decode_one)
            worker.start()
            worker.join()
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 2, 3]  # in another thread too, where OpenMP's own default does not follow torch


# ---- choosing the kernel set ---------------------------------------------------------------------------

def test_cag_simd_chooses_the_kernel_set(monkeypatch):
    best = require_native("auto")
    runs = native.cpu_sets()
    assert best.simd == runs[0] and runs[-1] == "portable"
    for simd in runs:
        monkeypatch.setenv("CAG_SIMD", simd)
        assert native.load() is native.load(simd) and native.load().simd == simd
    monkeypatch.setenv("CAG_SIMD", "sse9")
    with pytest.raises(CagError, match="CAG_SIMD must be one of auto, avx512, avx2, neon, portable"):
        settings.current()
    for simd in [s for s in native.SETS if s not in runs]:  # a set this CPU lacks is refused, never built and run
        monkeypatch.setenv("CAG_SIMD", simd)
        assert native.load() is None and f"does not run the {simd} kernels" in native.why_not()
    monkeypatch.delenv("CAG_SIMD")
    assert native.load() is best


def test_a_forced_set_is_what_models_pack_with(q4_model_dir, monkeypatch):
    require_native("portable")
    monkeypatch.setenv("CAG_SIMD", "portable")
    lm = models.load(str(q4_model_dir), device="cpu", dtype="float32")
    assert lm.packing.kernels.startswith("portable C")
    assert next(m for m in lm.model.modules() if isinstance(m, packed.PackedLinear))._fn.__self__.simd == "portable"
