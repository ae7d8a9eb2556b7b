"""Evaluation suite: CAG vs in-context vs sparse and dense RAG on one model, with scores, timings and plots."""

from .dataset import Dataset, Question, load  # noqa: F401
from ..errors import EvalError  # noqa: F401 - the package's error
from .runner import ALL_SYSTEMS, run  # noqa: F401

__all__ = ["run", "load", "Dataset", "Question", "EvalError", "ALL_SYSTEMS"]
