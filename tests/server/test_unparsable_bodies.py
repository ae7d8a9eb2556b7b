"""A JSON body the parser gives up on without a JSON syntax error (arrays or objects nested past Python's
recursion limit, bytes that are not UTF-8) is a 400 in OpenAI's shape with code invalid_json, as a
malformed body is, and a message saying what is wrong, on every route that reads JSON."""

from __future__ import annotations

import httpx
import pytest

from cag.server import ServerConfig, create_app
from serverutil import openai_error, serving

ROUTES = (("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/kbs"), ("PUT", "/v1/kbs/lanterns"))
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def url(cag_home):
    with serving(create_app(ServerConfig(response_cache=False))) as base:  # bodies are refused before any model
        yield base


@pytest.mark.parametrize("body", ["[" * 10_000 + "]" * 10_000, '{"model": ' + "{\"a\": " * 10_000 + "1" + "}" * 10_001])
def test_deeply_nested_json_is_invalid_json_saying_so(url, body):
    for method, route in ROUTES:
        r = httpx.request(method, url + route, content=body, headers=JSON, timeout=60)
        assert "too deeply" in openai_error(r, 400, "invalid_json")["message"], (route, r.text)


def test_a_body_that_is_not_utf8_is_invalid_json_saying_so(url):
    r = httpx.post(url + "/v1/chat/completions", content=b'{"model": "\xff\xfe"}', headers=JSON, timeout=60)
    assert "not UTF-8" in openai_error(r, 400, "invalid_json")["message"]


def test_a_malformed_body_keeps_its_code(url):
    r = httpx.post(url + "/v1/chat/completions", content=b'{"model": ', headers=JSON, timeout=60)
    assert "not valid JSON" in openai_error(r, 400, "invalid_json")["message"]
