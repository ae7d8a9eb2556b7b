"""Packed Q4_1/Q8_0 weights (cag.engines.torch.packed, cag/engines/torch/native): lossless packing, kernels that agree with BLAS,
rows that do not depend on their batch, clean fallbacks, and answers equal to the float32 path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import ggml_q41, ggml_q80, require_native

import torch_direct as eu
from cag.engines.torch import models, native, packed
from cag.engines.torch.workspace import Workspace


@pytest.fixture(params=list(native.SETS))
def kernels(request):
    """Each kernel set in turn (skipped where this CPU does not run it)."""
    return require_native(request.param)


@pytest.fixture
def native_kernels():
    return require_native()


def test_packing_is_lossless_or_refused():
    torch.manual_seed(0)
    w = torch.randn(96, 160)
    q41, q80 = ggml_q41(w), ggml_q80(w)
    assert torch.equal(packed.unpack(packed.pack_q41(q41), "q4_1"), q41)
    assert torch.equal(packed.unpack(packed.pack_q80(q80), "q8_0"), q80)
    assert packed.pack_q41(q41).shape == (96, 5, packed.Q41_BLOCK_BYTES)
    assert packed.pack_q41(w) is None and packed.pack_q80(w) is None  # ordinary float32 weights: not packed
    assert packed.pack_q41(q80) is None  # Q8_0 values need more than 16 levels per block
    assert packed.pack_q41(ggml_q41(torch.randn(8, 48 * 2))[:, :48]) is None  # K not a multiple of 32
    nudged = q41.clone()
    nudged[3, 7] = torch.nextafter(nudged[3, 7], torch.tensor(1e9))  # one ulp off the Q4_1 grid
    assert packed.pack_q41(nudged) is None


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_kernels_agree_with_float32_blas_and_rows_do_not_depend_on_their_batch(kernels, kind):
    torch.manual_seed(1)
    quant, pack = (ggml_q41, packed.pack_q41) if kind == "q4_1" else (ggml_q80, packed.pack_q80)
    lin = torch.nn.Linear(320, 200, bias=False)
    with torch.no_grad():
        lin.weight.copy_(quant(lin.weight))
    layer = packed.PackedLinear(lin, kind, pack(lin.weight), kernels)
    x = torch.randn(packed.ROW_LIMIT, 320)
    with torch.inference_mode():
        full = layer(x)
        torch.testing.assert_close(full, F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)
        for rows in (1, 3, 8, 9, 17):
            assert torch.equal(layer(x[:rows]), full[:rows]), rows  # bit-identical whatever the batch
        assert torch.equal(layer(x[5:6].view(1, 1, 320)).view(1, 200), full[5:6])
        bigger = torch.randn(packed.ROW_LIMIT + 1, 320)  # above the limit: float32 BLAS on the same weights
        assert torch.equal(layer(bigger), F.linear(bigger, lin.weight))
    grad_x = torch.randn(2, 320, requires_grad=True)
    layer(grad_x).sum().backward()  # with autograd on, the differentiable float32 path runs
    assert grad_x.grad is not None


def test_pack_model_packs_every_gguf_style_layer_and_reports_it(q4_model_dir, monkeypatch, native_kernels):
    lm = models.load(str(q4_model_dir), device="cpu", dtype="float32")
    report = lm.packing
    assert report.reason is None and report.packed == {"q4_1": 14, "q8_0": 1} and report.kept == 0
    assert report.packed_bytes < report.float32_bytes / 4
    assert "15 linear layers" in str(report)
    assert isinstance(lm.model.lm_head, packed.PackedLinear)
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight  # still tied
    assert all(not n.endswith("blocks") for n in lm.model.state_dict())  # checkpoints unchanged

    monkeypatch.setenv("CAG_PACKED_WEIGHTS", "0")
    off = models.load(str(q4_model_dir), device="cpu", dtype="float32")
    assert "CAG_PACKED_WEIGHTS=0" in off.packing.reason
    assert not any(isinstance(m, packed.PackedLinear) for m in off.model.modules())
    monkeypatch.delenv("CAG_PACKED_WEIGHTS")
    bf16 = models.load(str(q4_model_dir), device="cpu", dtype="bfloat16")
    assert "float32" in bf16.packing.reason


def test_random_float_weights_are_left_alone(tiny_lm):
    assert tiny_lm.packing.packed == {} and "no linear layer" in tiny_lm.packing.reason


def test_answers_equal_the_float32_path(q4_model_dir, native_kernels):
    fast = models.load(str(q4_model_dir), device="cpu", dtype="float32")
    exact = models.load(str(q4_model_dir), device="cpu", dtype="float32", pack=False)
    assert fast.packing.packed and exact.packing is None
    torch.manual_seed(2)
    prefix_ids = torch.randint(3, 500, (300,)).tolist()
    kv = eu.prefill(exact, prefix_ids)
    distinct = set()
    for i in range(6):
        question = torch.randint(3, 500, (5 + 7 * i,)).tolist()  # 5..40 tokens: packed question prefill too
        answers = [list(eu.generate(lm, question, Workspace(kv), reuse=len(prefix_ids),
                                        max_new_tokens=24)) for lm in (fast, exact)]
        assert answers[0] == answers[1], i
        reference = list(eu.generate(fast, prefix_ids + question, max_new_tokens=24))  # no cache
        assert reference == answers[0], i
        distinct.add(tuple(answers[0]))
    assert len(distinct) > 1  # the model is sharp enough that the comparison means something


def test_no_compiler_means_float32_not_an_error(q4_model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("CAG_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(native, "_CACHE", {})
    assert native.load() is None and "could not run" in native.why_not()
    lm = models.load(str(q4_model_dir), device="cpu", dtype="float32")
    assert lm.packing.packed == {} and "could not run" in lm.packing.reason
    assert list(eu.generate(lm, [5, 6, 7], max_new_tokens=4))  # still answers


def test_native_build_is_cached_and_keyed_by_kernel_set_and_cpu(kernels):
    assert kernels.path.is_file() and kernels.path.parent.name == "native"
    assert kernels.path.name.startswith("qmatmul-")
    assert native.load(kernels.simd) is kernels  # loaded once per process
    assert f"-DCAG_SIMD_{kernels.simd.upper()}" in kernels.flags
    assert kernels.describe.split(",")[0] == {"avx512": "AVX-512", "avx2": "AVX2+FMA+F16C", "neon": "NEON",
                                              "portable": "portable C"}[kernels.simd]
    others = [native.load(s) for s in native.cpu_sets() if s != kernels.simd]
    assert all(other.path != kernels.path for other in others)  # one library per kernel set
