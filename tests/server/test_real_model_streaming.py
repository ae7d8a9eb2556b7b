"""The official openai client streams a sample answer from the server on the real default model."""

from __future__ import annotations

import json

import openai
import pytest

import cag
from cag.server import ServerConfig, create_app
from conftest import SAMPLE_DOCS, SAMPLE_QUESTIONS
from serverutil import serving

pytestmark = pytest.mark.real_model


def test_openai_client_streams_from_the_default_model(real_home, real_lm, monkeypatch):
    monkeypatch.setenv("CAG_HOME", str(real_home))
    kb = cag.build([SAMPLE_DOCS], name="server-sample", lm=real_lm, log=lambda _m: None)
    item = json.loads(SAMPLE_QUESTIONS.read_text().splitlines()[0])
    want = kb.ask(item["q"], max_new_tokens=48)
    with serving(create_app(ServerConfig(semantic_threshold=None), real_lm)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        chunks = list(client.chat.completions.create(
            model="server-sample", max_tokens=48, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": item["q"]}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert text == want.answer
    assert item["a"].lower() in text.lower()
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == kb.tokens > 1000
