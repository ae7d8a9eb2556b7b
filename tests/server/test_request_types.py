"""Numbers and flags of a request are taken as JSON spells them, never converted: `max_tokens: true`,
`max_tokens: "8"`, `stream: "yes"` or `temperature: "0.7"` are each a 400 in OpenAI's shape naming the field
(param), with code invalid_request and a message saying what was sent, on every numeric or boolean field of
both completion bodies. A number field still takes a whole number (temperature 1). The undeclared extension
parameters cag refuses unless neutral (repetition_penalty, min_tokens, top_k…) are not neutral as true or false."""

from __future__ import annotations

import json
import typing

import httpx

from cag.server.schemas import ChatRequest, CompletionRequest
from serverutil import kb, url  # noqa: F401 - fixtures
from serverutil import openai_error

CHAT = ("/v1/chat/completions", {"model": "lanterns", "max_tokens": 2,
                                 "messages": [{"role": "user", "content": "How much is the Heron?"}]})
PROMPT = ("/v1/completions", {"model": "lanterns", "max_tokens": 2, "prompt": "How much is the Heron?"})
BAD = {bool: ["yes", 1, "true"], int: [True, "8", False], float: [True, "0.7"]}  # per kind: sent, never converted


def _kind(annotation) -> type | None:
    """The JSON number or flag kind a field's type holds anywhere inside it (Optional, Annotated, dict values)."""
    if annotation in (bool, int, float):
        return annotation
    return next(filter(None, (_kind(a) for a in typing.get_args(annotation))), None)


def _cases(model) -> list[tuple[str, object, str]]:
    """(field, value to send, the param the refusal names) for every numeric or boolean field of `model`."""
    cases = []
    for name, field in model.model_fields.items():
        kind = _kind(field.annotation)
        for bad in BAD.get(kind, []):
            cases.append((name, {"50256": bad}, f"{name}.50256") if name == "logit_bias" else (name, bad, name))
    return cases + [("stream_options", {"include_usage": bad}, "stream_options.include_usage") for bad in BAD[bool]]


def test_every_number_and_flag_of_both_bodies_refuses_other_json_types(url):  # noqa: F811
    refused = set()
    with httpx.Client(base_url=url, timeout=60) as http:
        for (path, base), model in ((CHAT, ChatRequest), (PROMPT, CompletionRequest)):
            for field, value, param in _cases(model):
                error = openai_error(http.post(path, json={**base, field: value}), 400, "invalid_request", param)
                sent = json.dumps(value if not isinstance(value, dict) else next(iter(value.values())))
                assert param in error["message"] and f"(got {sent}, " in error["message"], (path, field, error)
                refused.add(field)
    assert {"stream", "max_tokens", "temperature", "top_p", "seed", "n", "logprobs", "echo", "store",
            "max_completion_tokens", "logit_bias", "stream_options"} <= refused


def test_numbers_and_flags_of_the_right_json_type_are_answered(url):  # noqa: F811
    with httpx.Client(base_url=url, timeout=60) as http:
        for path, base in (CHAT, PROMPT):
            for extra in ({"temperature": 1, "top_p": 1, "seed": 3}, {"stream": False, "presence_penalty": 0},
                          {"temperature": 0.0, "logit_bias": {}, "n": 1, "best_of": 1},
                          {"stream": True, "stream_options": {"include_usage": True}}):
                r = http.post(path, json={**base, **extra})
                assert r.status_code == 200, (path, extra, r.text)


def test_extension_parameters_are_not_neutral_as_true_or_false(url):  # noqa: F811
    path, base = CHAT
    with httpx.Client(base_url=url, timeout=60) as http:
        for field, value in (("repetition_penalty", True), ("min_tokens", False), ("repeat_penalty", "1")):
            openai_error(http.post(path, json={**base, field: value}), 400, "unsupported_parameter", field)
        for field, value in (("top_k", False), ("typical_p", True)):
            openai_error(http.post(path, json={**base, "temperature": 1, field: value}), 400, "unsupported_parameter",
                         field)
        assert http.post(path, json={**base, "repetition_penalty": 1, "min_tokens": 0}).status_code == 200


def test_text_fields_take_no_numbers_or_flags(url):  # noqa: F811
    """What pydantic already refuses without conversion, kept so: the knowledge base named, a KB's documents."""
    with httpx.Client(base_url=url, timeout=60) as http:
        openai_error(http.post(CHAT[0], json={**CHAT[1], "model": 5}), 400, "invalid_request", "model")
        openai_error(http.post(PROMPT[0], json={**PROMPT[1], "prompt": True}), 400, "invalid_request", "prompt")
        for body, param in (({"name": 5, "documents": []}, "name"),
                            ({"name": "kb2", "documents": [{"name": "a.md", "text": 5}]}, "documents.0.text"),
                            ({"name": "kb2", "documents": [{"name": True, "text": "x"}]}, "documents.0.name")):
            openai_error(http.post("/v1/kbs", json=body), 400, "invalid_request", param)
