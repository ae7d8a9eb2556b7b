"""Byte sizes in the server config take the forms the environment's byte variables take: CAG_MODEL_BYTES=8G
works, and so do model_bytes = "300M", max_body_bytes = "1K" and max_upload_bytes = "20M" in a config file
(or a number of bytes), all read by the one parser, cag.settings.parse_bytes. A bad value is one error
naming the key, from `cag serve` too, and a size given as text is enforced as the number it says."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from cag import settings
from cag.server import create_app, load_config
from cag.server.config import ConfigError
from serverutil import openai_error, serving

KEYS = ("model_bytes", "max_body_bytes", "max_upload_bytes")


@pytest.fixture(autouse=True)
def no_keys(monkeypatch):
    monkeypatch.delenv("CAG_API_KEYS", raising=False)


def test_byte_sizes_in_a_config_file_take_the_environments_forms(tmp_path, monkeypatch):
    toml = tmp_path / "s.toml"
    toml.write_text('model_bytes = "300M"\nmax_body_bytes = "1K"\nmax_upload_bytes = 5000000\n')
    c = load_config(toml)
    assert (c.model_bytes, c.max_body_bytes, c.max_upload_bytes) == (300 << 20, 1 << 10, 5_000_000)
    monkeypatch.setenv("CAG_MODEL_BYTES", "300M")
    assert settings.current().model_bytes == c.model_bytes  # one parser: one value for one text
    (tmp_path / "s.json").write_text(json.dumps({"model_bytes": "8G", "max_upload_bytes": "2.5M"}))
    c = load_config(tmp_path / "s.json")
    assert (c.model_bytes, c.max_upload_bytes) == (8 << 30, int(2.5 * (1 << 20)))
    assert load_config(None).model_bytes is None  # left out: CAG_MODEL_BYTES decides


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("value", ["lots", "12 parsecs", True, 0, "0", -1, 1.5, None, [1]])
def test_a_bad_byte_size_is_one_error_naming_its_key(tmp_path, key, value):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({key: value}))
    if value is None and key == "model_bytes":  # null is no bad size: it leaves the budget to CAG_MODEL_BYTES
        assert load_config(path).model_bytes is None
        return
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value).startswith(f"{key} must be") and repr(value) in str(refused.value), refused.value


def test_a_byte_size_given_as_text_is_enforced(tmp_path, cag_home):
    path = tmp_path / "s.toml"
    path.write_text('max_body_bytes = "1K"\n')
    body = {"model": "lanterns", "messages": [{"role": "user", "content": "x"}]}
    with serving(create_app(load_config(path))) as url:
        openai_error(httpx.post(url + "/v1/chat/completions", json=body), 404, "model_not_found")  # under 1 KiB
        body["messages"][0]["content"] = "x" * 2000
        openai_error(httpx.post(url + "/v1/chat/completions", json=body), 413, "request_too_large")


def test_cag_serve_refuses_a_bad_byte_size_naming_the_key(tmp_path, cag_home):
    path = tmp_path / "s.toml"
    path.write_text('model_bytes = "300 megs"\n')
    proc = subprocess.run([sys.executable, "-m", "cag", "serve", "--config", str(path)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "CAG_HOME": str(cag_home)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: model_bytes must be a byte count like 1073741824, 512M or 2G "
                                  "(got '300 megs')"), proc.stderr
