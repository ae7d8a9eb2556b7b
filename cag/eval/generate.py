"""Synthetic evaluation datasets: registers of fictional people, towns and guilds that no model can know.

Every fact is stated once, in one paragraph, so single-fact questions have exactly one supporting
paragraph and two-hop questions need two (a person's mentor, then the mentor's town; a person's town,
then its river). Same seed, same size, same token counter: byte-identical output.

    python -m cag.eval.generate examples/datasets/fictional-3k.json --tokens 3000 --questions 30 --seed 3
"""

from __future__ import annotations

import argparse
import random
from typing import Callable

from .dataset import Dataset, Question

_SYL = ["ka", "vel", "ra", "os", "dri", "mon", "tha", "lu", "bre", "nik", "zor", "ae", "qui", "sel", "dum", "fen",
        "gal", "ish", "jor", "pel", "tov", "ur", "wyn", "xal", "yen", "ce", "bro", "mir", "hal", "sto"]
_TOWN_END = ["mere", "haven", "ford", "holt", "wick", "stead", "barrow", "crag", "fell", "moor"]
_RIVERS = ["Ossel", "Thrune", "Varro", "Kelbin", "Marrow", "Istra", "Ploven", "Gault", "Semmer", "Dovric", "Abrel",
           "Quenna", "Lisk", "Harrow", "Tamsin", "Yolde"]
_JOBS = ["glassblower", "cartographer", "beekeeper", "clockmaker", "ferryman", "bookbinder", "tanner", "astronomer",
         "herbalist", "stonemason", "luthier", "cooper", "weaver", "chandler", "falconer", "brewer"]
_GOODS = ["lanterns", "rope", "salt", "ink", "wool", "copper wire", "maps", "bells", "candles", "barley"]


def estimate_tokens(text: str) -> int:
    """~4 characters per token: good enough when no tokenizer is at hand (tests, quick use)."""
    return max(1, len(text) // 4)


def generate(tokens: int = 3000, questions: int = 30, seed: int = 0, two_hop: float = 0.35,
             count_tokens: Callable[[str], int] = estimate_tokens, name: str | None = None) -> Dataset:
    """A dataset whose documents hold about `tokens` tokens (by `count_tokens`), with single and two-hop questions."""
    rng = random.Random(seed)
    used: set[str] = set()
    towns = [_town(rng, used) for _ in range(max(4, tokens // 400))]
    people, guilds = [], []
    # grow the register until the rendered documents reach the target size
    while True:
        people.append(_person(rng, used, towns, people))
        if len(people) % 6 == 0:
            guilds.append(_guild(rng, used, towns, people))
        docs = _documents(towns, people, guilds)
        if sum(count_tokens(d["name"] + "\n" + d["text"]) for d in docs) >= tokens:
            break
    return Dataset(name or f"fictional-{tokens // 1000}k-s{seed}", docs,
                   _questions(rng, towns, people, guilds, questions, two_hop))


def _word(rng: random.Random, used: set[str], parts: int, end: str = "") -> str:
    while True:
        w = ("".join(rng.choice(_SYL) for _ in range(parts)) + end).capitalize()
        if w not in used:
            used.add(w)
            return w


def _town(rng, used) -> dict:
    return {"name": _word(rng, used, 2, rng.choice(_TOWN_END)), "river": rng.choice(_RIVERS),
            "founded": rng.randint(1040, 1790), "trade": rng.choice(_GOODS)}


def _person(rng, used, towns, people) -> dict:
    return {"name": f"{_word(rng, used, 2)} {_word(rng, used, 3)}", "job": rng.choice(_JOBS), "town": rng.choice(towns),
            "born": rng.randint(1801, 1899), "mentor": rng.choice(people) if people else None}


def _guild(rng, used, towns, people) -> dict:
    return {"name": f"The {_word(rng, used, 2)} Guild", "founder": rng.choice(people), "seat": rng.choice(towns),
            "year": rng.randint(1850, 1930)}


def _documents(towns, people, guilds) -> list[dict]:
    docs = [{"name": "Towns of the Vessary Valley", "text": "\n\n".join(
        f"{t['name']} was founded in {t['founded']}. The river {t['river']} flows through {t['name']}, "
        f"and the town is known for its {t['trade']}." for t in towns)}]
    for start in range(0, len(people), 12):
        docs.append({"name": f"Register of residents, part {start // 12 + 1}", "text": "\n\n".join(
            _profile(p) for p in people[start:start + 12])})
    if guilds:
        docs.append({"name": "Guilds of the valley", "text": "\n\n".join(
            f"{g['name']} was founded in {g['year']} by {g['founder']['name']}. Its seat is in {g['seat']['name']}."
            for g in guilds)})
    return docs


def _profile(p: dict) -> str:
    article = "an" if p["job"][0] in "aeiou" else "a"
    text = f"{p['name']} is {article} {p['job']} who lives in {p['town']['name']}. {p['name']} was born in {p['born']}."
    if p["mentor"]:
        text += f" {p['name']} learned the trade from {p['mentor']['name']}."
    return text


def _questions(rng, towns, people, guilds, count, two_hop) -> list[Question]:
    single = [
        lambda p: Question(f"In which town does {p['name']} live?", p["town"]["name"]),
        lambda p: Question(f"What is the profession of {p['name']}?", p["job"]),
        lambda p: Question(f"In what year was {p['name']} born?", str(p["born"])),
        lambda p: Question(f"Which river flows through {p['town']['name']}?", p["town"]["river"]),
    ]
    double = [
        lambda p: Question(f"Which river flows through the town where {p['name']} lives?", p["town"]["river"], 2),
        lambda p: p["mentor"] and Question(f"In which town does the mentor of {p['name']} live?",
                                           p["mentor"]["town"]["name"], 2),
    ]
    out, seen = [], set()
    tries = 0
    while len(out) < count and tries < count * 50:
        tries += 1
        templates = double if rng.random() < two_hop else single
        q = rng.choice(templates)(rng.choice(people))
        if guilds and rng.random() < 0.15:
            g = rng.choice(guilds)
            q = Question(f"Who founded {g['name']}?", g["founder"]["name"])
        if q and q.q not in seen:
            seen.add(q.q)
            out.append(q)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--tokens", type=int, default=3000, help="knowledge size in tokens of the default model")
    parser.add_argument("--questions", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--estimate", action="store_true", help="count ~4 chars/token instead of loading the tokenizer")
    args = parser.parse_args(argv)
    write(args.out, args.tokens, args.questions, args.seed, args.estimate)


def write(out: str, tokens: int, questions: int, seed: int, estimate: bool = False) -> Dataset:
    """Generate and save, counting tokens with the default model's tokenizer unless `estimate`."""
    count = estimate_tokens
    if not estimate:
        from .. import engines

        codec = engines.load(None, log=lambda _m: None).codec
        count = lambda text: len(codec.encode(text))  # noqa: E731
    data = generate(tokens, questions, seed, count_tokens=count)
    data.save(out)
    print(f"wrote {out}: {len(data.documents)} documents, ~{tokens} tokens, {len(data.questions)} questions")
    return data


if __name__ == "__main__":
    main()
