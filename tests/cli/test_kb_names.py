"""One naming scheme for the CLI and the server: a knowledge base is the name its user gave it, plus the
tenant that created it through the server (a column in `cag ls`, `--tenant` on the commands)."""

from __future__ import annotations

import json

import httpx
import pytest

import cag
from cag import cli
from cag.errors import NotFoundError
from cag.server import ServerConfig, create_app
from serverutil import serving, write_docs

KEYS = {"key-a": "alpha", "key-b": "beta"}
QUESTION = "Who guards the vault?"


def call(capsys, *args) -> tuple[str, str]:
    """`cag ARGS` in this process (the tests' CAG_HOME): its stdout and stderr."""
    capsys.readouterr()
    cli.app([str(a) for a in args], standalone_mode=False)
    captured = capsys.readouterr()
    return captured.out, captured.err


def run(capsys, *args) -> str:
    return call(capsys, *args)[0]


def listed(capsys) -> set[tuple[str, str | None]]:
    return {(row["name"], row.get("tenant")) for row in map(json.loads, run(capsys, "ls", "--json").splitlines())}


def create(base: str, name: str, text: str, key: str | None = None) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(base + "/v1/kbs", headers=headers, timeout=60,
                   json={"name": name, "documents": [{"name": "notes.md", "text": text}]})
    assert r.status_code == 201, r.text


def cache_file(capsys, *args) -> str:
    return json.loads(run(capsys, "inspect", *args, "--json"))["file"]


def config(model_dir, **kwargs) -> ServerConfig:
    """The server's own model (what knowledge bases created over HTTP are built with): the test's."""
    return ServerConfig(model=str(model_dir), semantic_threshold=None, **kwargs)


def test_a_kb_created_over_http_is_listed_and_asked_by_its_name(cag_home, sharp_lm, sharp_model_dir, capsys):
    with serving(create_app(config(sharp_model_dir, response_cache=False), sharp_lm)) as base:
        create(base, "benefits", "Dental cover starts after 90 days. Zephyrine the otter guards vault 7731.")
        r = httpx.post(base + "/v1/chat/completions", timeout=60, json={
            "model": "benefits", "max_tokens": 8, "messages": [{"role": "user", "content": QUESTION}]})
        assert r.status_code == 200, r.text
        served = r.json()["choices"][0]["message"]["content"]
    assert listed(capsys) == {("benefits", "public")}
    table = run(capsys, "ls")
    assert "public__" not in table
    assert any(line.split()[:2] == ["benefits", "public"] for line in table.splitlines()), table
    answer = json.loads(run(capsys, "ask", "benefits", QUESTION, "--json", "--max-new-tokens", "8"))
    assert answer["answer"] == served and answer["cached_tokens"] > 0  # the same knowledge base, from its cache
    assert json.loads(run(capsys, "ask", "benefits", QUESTION, "--json", "--max-new-tokens", "8", "--tenant",
                          "public"))["answer"] == served
    with pytest.raises(NotFoundError, match="tenant 'beta' has no knowledge base named 'benefits'"):
        run(capsys, "ask", "benefits", QUESTION, "--tenant", "beta")


def test_the_tenant_flag_selects_a_tenants_kb_and_names_never_collide(cag_home, sharp_lm, sharp_model_dir, tmp_path,
                                                                      capsys):
    cag.build([write_docs(tmp_path / "cli-docs")], name="notes", lm=sharp_lm, log=lambda _m: None)
    with serving(create_app(config(sharp_model_dir, api_keys=KEYS), sharp_lm)) as base:
        create(base, "notes", "Alpha's vault code is 7731.", "key-a")
        create(base, "notes", "Beta keeps the lantern ledger, a much longer note than alpha's.", "key-b")
        create(base, "ledger", "Only alpha has a ledger.", "key-a")
    assert listed(capsys) == {("notes", None), ("notes", "alpha"), ("notes", "beta"), ("ledger", "alpha")}
    home = cag_home / "kbs"
    assert cache_file(capsys, "notes") == str(home / "notes" / "cache.safetensors")  # the CLI's own
    assert cache_file(capsys, "notes", "--tenant", "alpha") == str(home / "alpha__notes" / "cache.safetensors")
    assert cache_file(capsys, "notes", "--tenant", "beta") == str(home / "beta__notes" / "cache.safetensors")
    tokens = {t: json.loads(run(capsys, "ask", "notes", "Who?", "--json", "--max-new-tokens", "2",
                                *(("--tenant", t) if t else ())))["cached_tokens"] for t in (None, "alpha", "beta")}
    assert len(set(tokens.values())) == 3  # three knowledge bases, three different prefixes
    with pytest.raises(NotFoundError, match="no knowledge base named 'ledger'.*tenant alpha has one: add --tenant alpha"):
        run(capsys, "ask", "ledger", "Who?")
    with pytest.raises(NotFoundError, match="tenant 'gamma' has no knowledge base named 'notes'.*alpha, beta"):
        run(capsys, "ask", "notes", "Who?", "--tenant", "gamma")
    run(capsys, "rm", "notes", "--tenant", "beta")
    assert listed(capsys) == {("notes", None), ("notes", "alpha"), ("ledger", "alpha")}


def test_tenant_folders_of_earlier_versions_keep_working(cag_home, sharp_lm, tmp_path, capsys):
    """A `TENANT__NAME` folder without an owner record (copied from an older version) is that tenant's NAME,
    and its old spelling still works on the command line."""
    docs = write_docs(tmp_path / "docs")
    cag.build([docs], name="public__handbook", lm=sharp_lm, log=lambda _m: None)
    assert not (cag_home / "kbs" / "public__handbook" / "tenant.json").exists()
    assert listed(capsys) == {("handbook", "public")}
    by_name = json.loads(run(capsys, "ask", "handbook", QUESTION, "--json", "--max-new-tokens", "6"))
    by_key = json.loads(run(capsys, "ask", "public__handbook", QUESTION, "--json", "--max-new-tokens", "6"))
    assert by_name["answer"] == by_key["answer"] and by_name["cached_tokens"] == by_key["cached_tokens"] > 0
    # the CLI's own knowledge base of that name comes first; the tenant's is one flag away, and said so
    cag.build([write_docs(tmp_path / "more", {"c.md": "A different, longer text about lanterns and otters."})],
              name="handbook", lm=sharp_lm, log=lambda _m: None)
    assert listed(capsys) == {("handbook", None), ("handbook", "public")}
    out, err = call(capsys, "inspect", "handbook", "--json")
    assert json.loads(out)["file"].endswith("/kbs/handbook/cache.safetensors")
    assert "tenant 'public' also has a knowledge base named 'handbook': --tenant public selects it" in err
    assert cache_file(capsys, "handbook", "--tenant", "public").endswith("/kbs/public__handbook/cache.safetensors")


def test_the_server_keeps_listing_tenant_kbs_by_their_names_only(cag_home, sharp_lm, sharp_model_dir):
    with serving(create_app(config(sharp_model_dir, api_keys=KEYS), sharp_lm)) as base:
        create(base, "notes", "Alpha's vault code is 7731.", "key-a")
        rows = httpx.get(base + "/v1/kbs", headers={"Authorization": "Bearer key-a"}).json()["data"]
        assert [r["name"] for r in rows] == ["notes"] and rows[0]["owned_by"] == "alpha"
        assert "alpha__notes" not in json.dumps(rows)  # the store's key stays the server's business
        assert httpx.get(base + "/v1/kbs", headers={"Authorization": "Bearer key-b"}).json()["data"] == []

