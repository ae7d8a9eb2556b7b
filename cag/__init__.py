"""cag: cache-augmented generation. Run knowledge through a model once, keep its KV cache, answer from it.

The public names load on first use, so `import cag` (and `cag --help`, `cag version`) does not pay for
torch and transformers until something needs them.
"""

__version__ = "0.1.0"

_WHERE = {"KnowledgeBase": "api", "build": "api", "load": "api", "list_kbs": "api", "delete": "api",
          "invalidate": "api", "publish": "api", "BuildOptions": "api", "EngineOptions": "engines.options",
          "Sampling": "sampling", "Batching": "scheduler",
          "CagError": "errors"}
_MODULES = ("engines",)  # `cag.engines.load(...)` after a plain `import cag`
__all__ = [*_WHERE, *_MODULES, "__version__"]


def __getattr__(name: str):
    if name in _WHERE or name in _MODULES:
        from importlib import import_module

        module = import_module(f".{_WHERE.get(name, name)}", __name__)
        value = module if name in _MODULES else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cag' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
