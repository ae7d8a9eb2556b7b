"""CAG_HOME: a home that does not exist yet is created and said so in one line; one that cannot be created or
written is refused before any work; the default model, converted once from its GGUF file, is shared with the
same user's other homes, and a shared copy is taken only after it verified."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cag import paths
from cag.engines.torch import models
from cliutil import assert_one_line_error

CAG = [sys.executable, "-m", "cag"]


def _run(args, home: Path, user: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`cag ARGS` with CAG_HOME=home and HOME=user (the shared models live under HOME: never the real one)."""
    env = {**os.environ, "CAG_HOME": str(home), "HOME": str(user)}
    env.pop("CAG_SIGNING_KEY", None)
    proc = subprocess.run(CAG + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"cag {args} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def _docs(tmp_path: Path) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "a.md").write_text("The Heron lantern costs 148 crowns. It is blue.")
    return docs


def test_a_new_home_is_created_and_said_so_in_one_line(tmp_path, tiny_model_dir):
    home = tmp_path / "not" / "yet" / "home"
    first = _run(["build", _docs(tmp_path), "--name", "kb", "--model", tiny_model_dir], home, tmp_path)
    said = [line for line in first.stderr.splitlines() if "CAG_HOME" in line]
    assert said == [f"CAG_HOME {home} did not exist: created it (knowledge bases and converted models are kept "
                    "there)"], first.stderr
    again = _run(["build", _docs(tmp_path), "--name", "kb", "--model", tiny_model_dir], home, tmp_path)
    assert "CAG_HOME" not in again.stderr  # only a new home is announced


def test_a_home_that_cannot_be_created_is_refused_before_the_model_is_converted(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = _run(["serve", "--port", "1"], blocker / "home", tmp_path, check=False)  # loads the default model
    assert_one_line_error(proc, "cannot store converted models under", "is not a folder")
    assert "Converting" not in proc.stderr


@pytest.fixture
def read_only(tmp_path):
    """A real read-only file system (a tmpfs mounted ro), or skip where this process may not mount one."""
    where = tmp_path / "ro"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a read-only file system needs root")
    yield where
    subprocess.run(["umount", str(where)], check=True)


def test_a_home_on_a_read_only_file_system_is_refused_before_any_work(tmp_path, tiny_model_dir, read_only):
    proc = _run(["build", _docs(tmp_path), "--name", "kb", "--model", tiny_model_dir], read_only / "home", tmp_path,
                check=False)
    assert_one_line_error(proc, f"cannot store knowledge bases under {read_only / 'home'}", "is not writable")
    assert "loading model" not in proc.stderr  # refused before the model was loaded


# -- sharing the converted default model between homes -----------------------------------------------------

def _converted(folder: Path, text: str = "weights") -> Path:
    """A folder as a conversion leaves it (files and the source record with their digest)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_text(text)
    (folder / "tokenizer.json").write_text("{}")
    source = {"gguf": "x.gguf", "gguf_size": 1, "gguf_sha256": "g" * 64}
    (folder / models.SOURCE_FILE).write_text(json.dumps({**source, "files_sha256": models._files_sha256(folder)}))
    return folder


@pytest.mark.parametrize("damage, why", [
    (None, None),
    (lambda f: (f / "tokenizer.json").write_text('{"added": 1}'), "its files differ from the digest"),
    (lambda f: (f / "config.json").write_text('{"model_type": "gpt2"}'), "its files differ from the digest"),
    (lambda f: (f / "extra.bin").write_text("x"), "its files differ from the digest"),
    (lambda f: (f / models.SOURCE_FILE).write_text('{"gguf_sha256": "' + "g" * 64 + '"}'), "records no digest"),
    (lambda f: (f / models.SOURCE_FILE).write_text('{"gguf_sha256": "' + "h" * 64 + '", "files_sha256": "0"}'),
     "converted from another GGUF file"),
    (lambda f: os.chmod(f / "model.safetensors", 0o666), "may be written by any user"),
    (lambda f: (f / "link").symlink_to(f / "config.json"), "is not a plain file"),
])
def test_a_shared_copy_is_taken_only_when_it_verifies(tmp_path, damage, why):
    shared = _converted(tmp_path / "shared")
    if damage:
        damage(shared)
    target = tmp_path / "home" / "models" / models.DEFAULT_MODEL
    target.parent.mkdir(parents=True)
    said = []
    took = models._take_shared(shared, target, {"gguf_sha256": "g" * 64}, said.append)
    assert took == (why is None) and target.exists() == took, said
    assert len(said) == 1 and (why is None or why in said[0]), said
    assert [p.name for p in target.parent.iterdir()] == ([models.DEFAULT_MODEL] if took else [])  # no temp left
    if took:
        assert (target / "model.safetensors").read_text() == "weights"


def test_the_default_model_is_converted_once_per_user_and_shared_with_new_homes(tmp_path, monkeypatch):
    """The real conversion (20 s to over a minute), in a process whose stderr is a pipe: no carriage-return
    frames in it. A second home then takes the shared copy (hard links), verified: the very same model."""
    user = tmp_path / "user"
    env = {**os.environ, "CAG_HOME": str(tmp_path / "a"), "HOME": str(user)}
    code = "from cag.engines.torch import models; models.ensure_default_model()"
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0 and "\r" not in first.stderr, first.stderr
    lines = first.stderr.splitlines()
    assert lines[0].startswith("CAG_HOME ") and lines[1].startswith("Converting the default model"), lines
    assert lines[2].startswith("Converted in ") and lines[3].startswith("Shared it with this user's other homes")
    assert len(lines) == 4, lines
    monkeypatch.setenv("CAG_HOME", str(tmp_path / "b"))
    monkeypatch.setenv("HOME", str(user))
    said = []
    model_b = models.ensure_default_model(said.append)
    assert len(said) == 2 and said[1].startswith("Took the default model from"), said
    model_a = tmp_path / "a" / "models" / models.DEFAULT_MODEL
    assert model_b == tmp_path / "b" / "models" / models.DEFAULT_MODEL
    assert sorted(p.name for p in model_a.iterdir()) == sorted(p.name for p in model_b.iterdir())
    assert all((model_a / p.name).stat().st_ino == p.stat().st_ino for p in model_b.iterdir())  # hard links
    assert models.model_fingerprint(model_a) == models.model_fingerprint(model_b)


def test_the_shared_models_folder_is_in_the_users_own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.shared_models_dir() == tmp_path / ".cache" / "cag" / "shared-models"
