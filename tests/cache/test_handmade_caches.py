"""Cache files made by hand, each with its digest recomputed and no signing key set (so the checksum
passes, as it would for anyone who forges one), are refused when loaded, naming what is wrong: by `cag ask`
as one line with exit code 1, by the server as a 4xx with an error code. None of them may load and then fail
on the first question, or answer with nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest
import torch

import cag
from cag import cli
from cag.server import ServerConfig, create_app
from serverutil import serving, write_docs
from cliutil import assert_one_line_error
from cacheutil import resave


def _kv(tensors: dict) -> list[str]:
    return [k for k in tensors if k.split(".")[0] in ("k", "v")]


def _float64(tensors):
    for k in _kv(tensors):
        tensors[k] = tensors[k].double()


def _head_size_32(tensors):
    for k in _kv(tensors):
        tensors[k] = torch.cat([tensors[k], tensors[k]], dim=-1)


def _layers(n: int):
    def edit(tensors):
        first = {k.split(".")[0]: tensors[k] for k in _kv(tensors) if k.endswith(".0")}
        for k in _kv(tensors):
            del tensors[k]
        for i in range(n):
            for kind, t in first.items():
                tensors[f"{kind}.{i}"] = t.clone()
    return edit


def _nan_keys(tensors):
    tensors["k.0"][0, 0, 3, 5] = float("nan")


def _shapes(tensors, manifest):
    n = len([k for k in tensors if k.startswith("k.")])
    manifest.update(layers=n, shapes={kind: [list(tensors[f"{kind}.{i}"].shape) for i in range(n)] for kind in "kv"})


# name: (tensor edit, manifest edit, what the one-line error must say)
FORGERIES = {
    "float64 KV": (_float64, lambda t, m: (_shapes(t, m), m.update(dtype="float64")), "dtype (file has float64"),
    "float64 KV, manifest says float32": (_float64, _shapes, "are float64, but the model runs in float32"),
    "head size 32": (_head_size_32, _shapes, "needs [1, 2, "),
    "0 layers": (_layers(0), _shapes, "holds 0 layers"),
    "29 layers": (_layers(29), _shapes, "holds 29 layers"),
    "NaN keys": (_nan_keys, None, "NaN or infinite"),
    "format_version true": (None, lambda t, m: m.update(format_version=True), "format version"),
    "layers true": (None, lambda t, m: m.update(layers=True), "field 'layers'"),
    "shapes as text": (None, lambda t, m: m.update(shapes="[1, 2]"), "field 'shapes'"),
    "a shape holding true": (None, lambda t, m: m["shapes"]["k"][0].__setitem__(0, True), "field 'shapes'"),
    "model as text": (None, lambda t, m: m.update(model="tiny"), "field 'model'"),
    "document count true": (None, lambda t, m: m["knowledge"].update(documents=True), "field 'knowledge'"),
    "valid, made by hand": (None, lambda t, m: m.update(prefill_bounds=[m["tokens"]]), None),  # the control
    "a prefill bound true": (None, lambda t, m: m.update(prefill_bounds=[True, m["tokens"]]), "field 'prefill_bounds'"),
    "tokens as text": (None, lambda t, m: m.update(tokens=str(m["tokens"])), "field 'tokens'"),
}


def forge(path, name: str) -> None:
    """Rewrite the cache at `path` as FORGERIES[name] says, recomputing its digest as kvfile does."""
    edit_tensors, edit_manifest, _ = FORGERIES[name]
    state = {}

    def tensors(t):
        if edit_tensors:
            edit_tensors(t)
        state["tensors"] = t

    def manifest(m):
        if edit_manifest:
            edit_manifest(state["tensors"], m)

    resave(path, edit_manifest=manifest, edit_tensors=tensors, recompute=True)


@pytest.fixture
def built(cag_home, tiny_lm, tmp_path, monkeypatch):
    """A knowledge base built with the tiny model, and a pristine copy of its cache to forge from."""
    monkeypatch.setenv("CAG_MEMORY_BYTES", "0")  # every load reads the file on disk
    cag.build([write_docs(tmp_path / "docs")], name="kb", lm=tiny_lm, log=lambda _m: None)
    cache = cag_home / "kbs" / "kb" / "cache.safetensors"
    pristine = tmp_path / "pristine.safetensors"
    shutil.copy(cache, pristine)
    return cache, pristine


def _ask_in_process(capsys, monkeypatch, *args) -> tuple[int, str]:
    """`cag ask` through cli.main() in this process (the tiny model is on disk, so it loads in a moment)."""
    monkeypatch.setattr(sys, "argv", ["cag", "ask", *args])
    with pytest.raises(SystemExit) as done:
        cli.main()
        raise SystemExit(0)
    return done.value.code or 0, capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_a_hand_made_cache_is_refused_by_cag_ask_in_one_line(built, name, tiny_model_dir, capsys, monkeypatch):
    cache, pristine = built
    shutil.copy(pristine, cache)
    forge(cache, name)
    code, stderr = _ask_in_process(capsys, monkeypatch, "kb", "How much is the Heron?", "--max-new-tokens", "4",
                                   "--no-rebuild")
    needle = FORGERIES[name][2]
    if needle is None:  # the control: a valid file made by hand loads and answers
        assert code == 0, stderr
        return
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 1 and lines[-1].startswith("error: ") and needle in lines[-1], stderr
    assert "Traceback" not in stderr and sum(line.startswith("error") for line in lines) == 1, stderr


def test_cag_ask_refuses_a_float64_cache_as_a_user_runs_it(built, tiny_model_dir):
    """The same through a real `cag ask` process."""
    cache, pristine = built
    forge(cache, "float64 KV, manifest says float32")
    env = {**os.environ, "CAG_HOME": str(cache.parents[2])}
    proc = subprocess.run([sys.executable, "-m", "cag", "ask", "kb", "How much is the Heron?"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert_one_line_error(proc, "layer 0 keys of the cache are float64, but the model runs in float32")


def test_the_server_answers_a_hand_made_cache_with_a_4xx_and_a_code(built, tiny_lm):
    cache, pristine = built
    ask = {"model": "kb", "max_tokens": 4, "messages": [{"role": "user", "content": "How much is the Heron?"}]}
    with serving(create_app(ServerConfig(response_cache=False), tiny_lm)) as url:
        for name in sorted(FORGERIES):
            shutil.copy(pristine, cache)
            forge(cache, name)
            os.utime(cache, ns=(cache.stat().st_atime_ns, cache.stat().st_mtime_ns + 1_000_000))  # a new file
            for stream in (False, True):
                r = httpx.post(url + "/v1/chat/completions", json={**ask, "stream": stream}, timeout=120)
                if FORGERIES[name][2] is None:  # the control answers
                    assert r.status_code == 200 and ("[DONE]" in r.text if stream else r.json()["choices"]), r.text
                    continue
                assert r.status_code == 409, (name, r.status_code, r.text)
                error = r.json()["error"]
                assert error["code"] == "cache_unusable" and FORGERIES[name][2] in error["message"], (name, error)
                assert str(cache.parent) not in error["message"]  # no server path in the message
            listed = httpx.get(url + "/v1/models", timeout=60)
            assert listed.status_code == 200 and "kb" in json.dumps(listed.json())
