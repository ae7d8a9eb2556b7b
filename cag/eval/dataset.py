"""Evaluation datasets: documents + questions + reference answers, in cag's JSON format or imported from SQuAD.

Format (one JSON file):
    {"name": "...", "documents": [{"name": "...", "text": "..."}],
     "questions": [{"q": "...", "a": "...", "hops": 1}]}      # "hops" is optional

SQuAD v1/v2 files ({"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}) import as one document per
context and one question per answerable qa, with the first answer's text as the reference.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import EvalError


@dataclass(frozen=True)
class Question:
    q: str
    a: str
    hops: int = 1


@dataclass
class Dataset:
    name: str
    documents: list[dict]  # {"name", "text"}
    questions: list[Question] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"name": self.name, "documents": self.documents, "questions": [asdict(q) for q in self.questions]}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    def limited(self, limit: int | None) -> "Dataset":
        """The same documents with only the first `limit` questions (a quick run keeps the full knowledge)."""
        if not limit:
            return self
        return Dataset(self.name, self.documents, self.questions[:limit])


def load(path: str | Path) -> Dataset:
    """Read a cag or SQuAD-style JSON file; refuse anything else with a message saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"dataset file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise EvalError(f"{path} is not valid JSON: {err}") from None
    if isinstance(data, dict) and "data" in data and "documents" not in data:
        return from_squad(data, default_name=path.stem)
    return from_json(data, where=str(path), default_name=path.stem)


def from_json(data: object, where: str = "dataset", default_name: str = "dataset") -> Dataset:
    if not isinstance(data, dict) or not isinstance(data.get("documents"), list) or not isinstance(data.get("questions"), list):
        raise EvalError(f'{where}: expected {{"name", "documents": [{{"name","text"}}], "questions": [{{"q","a"}}]}} '
                        "or a SQuAD-style file")
    docs = []
    for i, d in enumerate(data["documents"]):
        if not isinstance(d, dict) or not isinstance(d.get("text"), str) or not d["text"].strip():
            raise EvalError(f'{where}: documents[{i}] needs a non-empty "text"')
        docs.append({"name": str(d.get("name") or f"doc-{i + 1}"), "text": d["text"]})
    questions = []
    for i, q in enumerate(data["questions"]):
        if not isinstance(q, dict) or not _text(q.get("q")) or not _text(q.get("a")):
            raise EvalError(f'{where}: questions[{i}] needs non-empty "q" and "a" strings')
        questions.append(Question(q["q"].strip(), q["a"].strip(), int(q.get("hops", 1))))
    if not docs or not questions:
        raise EvalError(f"{where}: a dataset needs at least one document and one question")
    return Dataset(str(data.get("name") or default_name), docs, questions)


def from_squad(data: dict, default_name: str = "squad") -> Dataset:
    docs, questions = [], []
    for article in data.get("data") or []:
        title = str(article.get("title") or "article")
        for j, para in enumerate(article.get("paragraphs") or []):
            context = para.get("context")
            if not _text(context):
                continue
            docs.append({"name": f"{title} {j + 1}" if len(article["paragraphs"]) > 1 else title, "text": context})
            for qa in para.get("qas") or []:
                answers = [a.get("text") for a in qa.get("answers") or [] if _text(a.get("text"))]
                if qa.get("is_impossible") or not answers or not _text(qa.get("question")):
                    continue  # SQuAD v2 unanswerable questions have no reference to score against
                questions.append(Question(qa["question"].strip(), answers[0].strip()))
    if not docs or not questions:
        raise EvalError("the SQuAD-style file holds no contexts with answerable questions")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(data.get("name") or default_name))
    return Dataset(name, docs, questions)


def _text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())
