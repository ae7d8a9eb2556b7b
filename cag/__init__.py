"""cag: cache-augmented generation. Run knowledge through a model once, keep its KV cache, answer from it."""

__version__ = "0.1.0"

from .api import KnowledgeBase, build, delete, invalidate, list_kbs, load, publish  # noqa: E402
from .engine import Sampling  # noqa: E402
from .errors import CagError  # noqa: E402

__all__ = ["KnowledgeBase", "build", "load", "list_kbs", "delete", "invalidate", "publish", "Sampling", "CagError", "__version__"]
