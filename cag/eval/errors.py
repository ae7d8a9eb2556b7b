"""The evaluation suite's one exception type, so the CLI can print it as one line like every other cag error."""

from __future__ import annotations

from ..errors import CagError


class EvalError(CagError):
    """A dataset is malformed or an evaluation option cannot be honoured."""
