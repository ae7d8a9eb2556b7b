"""The README's two commands install the versions that were tested, and nothing beside cag shadows a package.

scripts/setup.sh installs requirements/lock.txt (pip-compile with hashes) on the platform the lock was
made for. A script in bench/, scripts/ or examples/ runs with its own folder first on sys.path, so a file
there named like an installed package (bench/kernels.py beside the `kernels` package that transformers
imports) replaces that package for every import in the run: no file there may take such a name.
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import re
import sys
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
SCRIPT_DIRS = ("bench", "scripts", "examples")
LOCK = ROOT / "requirements" / "lock.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _pins() -> dict[str, tuple[str, str | None]]:
    """Each locked distribution: (version, environment marker or None)."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        m = PIN.match(line)
        if m:
            pins[_norm(m[1])] = (m[2], m[3])
    return pins


def _module_names(folder: Path) -> set[str]:
    """The top-level names a script in `folder` (or in a folder below it) would import from its own folder."""
    names = set()
    for path in folder.rglob("*"):
        if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").is_file()):
            names.add(path.stem if path.is_file() else path.name)
    return names


def _taken_names() -> set[str]:
    """Importable top-level names: the standard library's, every installed distribution's, every locked one's."""
    taken = {_norm(n) for n in sys.stdlib_module_names}
    taken |= {_norm(n) for n in md.packages_distributions()}
    taken |= {_norm(d.metadata["Name"]) for d in md.distributions() if d.metadata["Name"]}
    return taken | set(_pins())


def test_no_file_beside_cag_shadows_an_importable_module():
    taken = _taken_names()
    assert "kernels" in taken and "json" in taken  # the check sees both installed and standard modules
    clashes = sorted(f"{d}/{name}" for d in SCRIPT_DIRS for name in _module_names(ROOT / d) if _norm(name) in taken)
    assert not clashes, f"these shadow an importable module for every script beside them; rename them: {clashes}"


def test_the_lock_pins_every_file_with_a_hash_and_covers_pyproject():
    text = LOCK.read_text()
    pins = _pins()
    assert len(pins) > 50
    blocks = [b for b in re.split(r"\n(?=[A-Za-z0-9])", text) if PIN.match(b.splitlines()[0])]
    assert all("--hash=sha256:" in b for b in blocks), "every pinned release carries its files' hashes"
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    env = {"python_version": "3.11", "sys_platform": "linux", "platform_machine": "x86_64"}
    for req in wanted:
        if req.marker and not req.marker.evaluate(env):
            continue
        assert _norm(req.name) in pins, f"{req.name} is a dependency but not in the lock (run scripts/lock.sh)"
        assert req.specifier.contains(pins[_norm(req.name)][0], prereleases=True), (req, pins[_norm(req.name)])


@pytest.mark.skipif(not (sys.version_info[:2] == (3, 11) and sys.platform == "linux" and platform.machine() == "x86_64"),
                    reason="requirements/lock.txt is made for CPython 3.11 on Linux x86_64")
def test_the_environment_holds_exactly_the_locked_versions():
    wrong = []
    for name, (version, marker) in _pins().items():
        if marker and not Marker(marker).evaluate():
            continue
        try:
            found = md.version(name)
        except md.PackageNotFoundError:
            found = None
        if found != version:
            wrong.append(f"{name}: locked {version}, installed {found}")
    assert not wrong, "the environment is not the tested one (run scripts/setup.sh): " + "; ".join(wrong)
