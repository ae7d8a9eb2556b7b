"""The code keeps its rooms: no module imports from a room above its own (the README's layout, measured by
scripts/structure.py), no lazy import hides an import loop, and the server's functions stay short."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _structure():
    spec = importlib.util.spec_from_file_location("structure", ROOT / "scripts" / "structure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_runs_back_up_a_layer_and_no_lazy_import_hides_a_loop():
    figures = _structure().measure()
    assert figures["imports_up_a_layer"] == []
    assert figures["lazy_imports_hiding_a_loop"] == []


def test_the_checks_see_an_upward_import_and_a_hidden_loop(tmp_path):
    """The measure itself, on a package written for it: an engine module importing the server is reported,
    and so is a lazy import whose target imports the importer back at its top level."""
    for name, text in {"__init__.py": "", "engines/__init__.py": "def load():\n    from . import llamacpp\n",
                       "engines/llamacpp.py": "from . import load\n", "engines/torch.py": "from ..server import app\n",
                       "server/__init__.py": "", "server/app.py": "from ..engines import load\n"}.items():
        (tmp_path / "cag" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cag" / name).write_text(text)
    figures = _structure().measure(tmp_path)
    assert [(u["from"], u["imports"]) for u in figures["imports_up_a_layer"]] == [("cag.engines.torch", "cag.server.app")]
    assert [(u["from"], u["imports"]) for u in figures["lazy_imports_hiding_a_loop"]] == [
        ("cag.engines", "cag.engines.llamacpp")]


def test_no_function_in_the_server_is_longer_than_sixty_lines():
    long = [f for f in _structure().measure()["longest"] if f["where"].startswith("cag/server/") and f["lines"] > 60]
    assert long == []
