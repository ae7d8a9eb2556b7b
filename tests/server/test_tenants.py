"""Auth, tenant isolation and knowledge-base management over HTTP, on the tiny model."""

from __future__ import annotations

import httpx
import openai
import pytest

import cag
from cag.server import ServerConfig, create_app
from serverutil import serving, write_docs

SECRET = "Zephyrine the otter guards vault 7731."
KEYS = {"key-a": "alpha", "key-b": "beta"}


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def url(cag_home, sharp_lm, tmp_path):
    cag.build([write_docs(tmp_path / "cli-docs")], name="clikb", lm=sharp_lm, log=lambda _m: None)
    with serving(create_app(ServerConfig(api_keys=KEYS, semantic_threshold=None), sharp_lm)) as base:
        yield base


def _ask(url: str, key: str, model: str, q: str = "Who guards the vault?") -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers=_auth(key), timeout=60,
                      json={"model": model, "max_tokens": 6, "messages": [{"role": "user", "content": q}]})


def test_keys_are_required_and_checked(url):
    assert httpx.get(url + "/v1/models").status_code == 401
    r = httpx.get(url + "/v1/models", headers=_auth("wrong"))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(url + "/healthz").status_code == 200  # probes need no key


def test_tenants_never_see_each_others_kbs(url, cag_home):
    r = httpx.post(url + "/v1/kbs", headers=_auth("key-a"), timeout=60,
                   json={"name": "notes", "documents": [{"name": "vault", "text": SECRET}]})
    assert r.status_code == 201, r.text
    assert r.json()["documents"] == ["vault.txt"]
    assert [m["id"] for m in httpx.get(url + "/v1/models", headers=_auth("key-a")).json()["data"]] == ["notes"]
    # beta: not listed, not answerable, not deletable, and the 404 is the same as for a name nobody has
    assert httpx.get(url + "/v1/models", headers=_auth("key-b")).json()["data"] == []
    other, absent = _ask(url, "key-b", "notes"), _ask(url, "key-b", "nothing")
    assert other.status_code == absent.status_code == 404
    assert other.json()["error"]["message"].replace("notes", "X") == absent.json()["error"]["message"].replace("nothing", "X")
    assert "otter" not in other.text and "alpha" not in other.text
    assert httpx.delete(url + "/v1/kbs/notes", headers=_auth("key-b")).status_code == 404
    assert httpx.get(url + "/v1/kbs/notes", headers=_auth("key-b")).status_code == 404
    # CLI-built KBs are not shared while keys are configured (share_cli_kbs is off)
    assert _ask(url, "key-a", "clikb").status_code == 404
    # beta may use the same name for its own KB; both answer from their own knowledge
    r = httpx.post(url + "/v1/kbs", headers=_auth("key-b"), timeout=60,
                   json={"name": "notes", "documents": [{"name": "other.md", "text": "Nothing secret here."}]})
    assert r.status_code == 201 and r.json()["documents"] == ["other.md"]
    assert _ask(url, "key-a", "notes").status_code == _ask(url, "key-b", "notes").status_code == 200
    assert sorted(p.name for p in (cag_home / "kbs").iterdir()) == ["alpha__notes", "beta__notes", "clikb"]
    dup = httpx.post(url + "/v1/kbs", headers=_auth("key-a"), json={"name": "notes", "documents": [
        {"name": "x", "text": "y"}]})
    assert dup.status_code == 409


def test_upload_replace_delete(url, cag_home):
    files = [("files", ("guide.md", b"# Guide\nThe Heron lantern is blue.", "text/markdown")),
             ("files", ("extra.txt", b"Opening hours: 9 to 5.", "text/plain"))]
    r = httpx.post(url + "/v1/kbs/upload", headers=_auth("key-a"), data={"name": "up"}, files=files, timeout=60)
    assert r.status_code == 201, r.text
    before = r.json()
    assert before["documents"] == ["extra.txt", "guide.md"]
    bad = httpx.post(url + "/v1/kbs/upload", headers=_auth("key-a"), data={"name": "up2"},
                     files=[("files", ("evil.exe", b"MZ", "application/octet-stream"))])
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unsupported_file"
    too_big = httpx.put(url + "/v1/kbs/up", headers=_auth("key-a"), timeout=60,
                        json={"documents": [{"name": "big.md", "text": "A much longer replacement text. " * 40}]})
    assert too_big.status_code == 400 and "at most 512 fit" in too_big.json()["error"]["message"]
    assert httpx.get(url + "/v1/kbs/up", headers=_auth("key-a")).json()["documents"] == before["documents"]
    assert sorted(p.name for p in (cag_home / "kbs" / "alpha__up" / "docs").iterdir()) == before["documents"]
    r = httpx.put(url + "/v1/kbs/up", headers=_auth("key-a"), timeout=60,
                  json={"documents": [{"name": "new.md", "text": "A much longer replacement text. " * 10}]})
    assert r.status_code == 200, r.text
    assert r.json()["documents"] == ["new.md"] and r.json()["tokens"] > before["tokens"]
    assert sorted(p.name for p in (cag_home / "kbs" / "alpha__up" / "docs").iterdir()) == ["new.md"]
    r = httpx.put(url + "/v1/kbs/up/upload", headers=_auth("key-a"), timeout=60,
                  files=[("files", ("guide.md", b"Short.", "text/markdown"))])
    assert r.status_code == 200 and r.json()["documents"] == ["guide.md"]
    assert httpx.delete(url + "/v1/kbs/up", headers=_auth("key-a")).status_code == 200
    assert httpx.get(url + "/v1/kbs/up", headers=_auth("key-a")).status_code == 404
    assert not (cag_home / "kbs" / "alpha__up").exists()
    assert httpx.post(url + "/v1/kbs", headers=_auth("key-a"), json={"name": "../x", "documents": [
        {"name": "a", "text": "b"}]}).status_code == 400


def test_open_server_serves_cli_kbs_to_everyone(cag_home, sharp_lm, tmp_path):
    cag.build([write_docs(tmp_path / "d")], name="clikb", lm=sharp_lm, log=lambda _m: None)
    with serving(create_app(ServerConfig(semantic_threshold=None), sharp_lm)) as base:
        assert [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]] == ["clikb"]
        assert httpx.delete(base + "/v1/kbs/clikb").status_code == 403  # CLI KBs are read-only here
        assert _ask(base, "anything", "clikb").status_code == 200
