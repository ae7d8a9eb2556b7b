"""The model and its load options travel as one EngineOptions (and a build's as one BuildOptions): options
that do not apply to the model's engine are refused by name before any work, a knowledge base's recorded
options are merged with the ones given now in one place, and a misspelt option is an error, not ignored."""

import pytest

import cag
from cag.api import BuildOptions
from cag.engines.options import EngineOptions
from cag.errors import CagError


@pytest.mark.parametrize("given, flag", [
    (dict(model="m.gguf", dtype="float32"), "--dtype does not apply to GGUF models"),
    (dict(model=None, kv_type="q8_0"), "--kv-type does not apply to Hugging Face models"),
    (dict(model="some/folder", context=512), "--context does not apply to Hugging Face models"),
    (dict(model="m.gguf", kv_type="q4"), "--kv-type must be f16, bf16 or q8_0 (got 'q4')"),
])
def test_an_option_that_does_not_apply_is_refused_by_name(given, flag):
    with pytest.raises(CagError, match=flag.replace("(", r"\(").replace(")", r"\)")):
        EngineOptions(**given).checked()


def test_options_that_apply_pass_and_a_server_drops_the_ones_that_do_not():
    gguf = EngineOptions(model="ollama:llama3.2", dtype="bfloat16", kv_type="q8_0", context=2048, threads=2)
    assert gguf.applying() == EngineOptions(model="ollama:llama3.2", kv_type="q8_0", context=2048, threads=2)
    hf = EngineOptions(model=None, device="cpu", dtype="float32", kv_type="q8_0", threads=1)
    assert hf.applying() == EngineOptions(device="cpu", dtype="float32", threads=1)
    assert hf.applying().checked().recorded() == {"dtype": "float32"}


def test_a_knowledge_base_loads_with_its_recorded_options_and_the_ones_given_now_win():
    meta = {"model": "m.gguf", "kv_type": "q8_0", "context": 4096, "dtype": None, "reserve": 512}
    assert EngineOptions(threads=3).over(meta) == EngineOptions("m.gguf", kv_type="q8_0", context=4096, threads=3)
    assert EngineOptions(dtype="bfloat16").over({"model": "folder", "dtype": "float32"}).dtype == "bfloat16"


def test_a_misspelt_option_is_an_error_not_ignored():
    with pytest.raises(TypeError, match="unknown engine option 'kvtype'"):
        cag.engines.load("m.gguf", kvtype="q8_0")
    with pytest.raises(TypeError, match="unknown engine option 'reserv'"):
        BuildOptions.of(None, reserv=256)


def test_build_options_merge_build_and_engine_fields_by_name_keeping_the_rest():
    base = BuildOptions(EngineOptions(model="m.gguf", kv_type="q8_0"), reserve=1024)
    merged = BuildOptions.of(base, threads=3, shard=True)
    assert merged.engine == EngineOptions(model="m.gguf", kv_type="q8_0", threads=3)
    assert (merged.reserve, merged.shard, merged.chunk_size) == (1024, True, base.chunk_size)
    assert BuildOptions.of(None) == BuildOptions()
