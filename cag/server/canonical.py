"""The canonical form of a question: what must match before the response cache may call two questions the same.

Sentence embeddings alone cannot tell "every week" from "every month", "who founded" from "when was … founded",
900 from 9000 or "can" from "cannot": such near misses score a MiniLM cosine of up to 0.996, higher than many
true paraphrases (measured by bench/respcache.py). So the semantic level serves an earlier answer only when
both questions reduce to the same canonical form, and their embeddings agree as well.

The form keeps every word and symbol that can change what is asked, in order: names, numbers, units and
time words, question words, articles, negation, comparatives, verbs, prepositions, tense. It forgets only
what cannot: letter case, punctuation, a polite frame ("can you tell me …", "please"), where the first
auxiliary verb stands ("when was X founded" / "when X was founded"; the auxiliary itself still counts),
contractions, how a number is written (nine hundred / 900, 1,000 / 1000, forty-five / 45, first / 1st),
spelling variants and abbreviations of units (kilometres / kilometers / km, colour / color) and how a rate
is said (every / each / per week, weekly). It never stems and knows no synonyms: another word is another
question. Reworded or reordered paraphrases therefore miss, which costs one model run and never a wrong answer.
"""

from __future__ import annotations

import re

Form = tuple[tuple[str, ...], str]

# numbers (3.2, 10:15, 12a, 1st), words with an inner apostrophe, and every other symbol but sentence punctuation
_TOKEN = re.compile(r"(?<![\w.])-?\d+(?:[.:]\d+)*[^\W_]*"
                    r"|[^\W\d_]+(?:'[^\W\d_]+)?"
                    r"|[^\w\s.,;:!?\"'()\[\]{}…–—\-。，、；：！？（）「」]")
_THOUSANDS = re.compile(r"(?<![\d.,])(\d{1,3})((?:,\d{3})+)(?![\d,])")

_FRAMES = [f.split() for f in (  # polite wrappers in front of a question, longest first
    "can you please tell me", "could you please tell me", "would you please tell me", "can you tell me",
    "could you tell me", "would you tell me", "please tell me", "tell me", "do you know", "i would like to know",
    "i want to know", "i wonder", "quick question", "hi", "hello", "hey")]
_DROP = {"please", "kindly"}
_AUX = {"is": "be", "are": "be", "am": "be", "'s": "be", "'re": "be", "'m": "be", "was": "was", "were": "was",
        "do": "do", "does": "do", "did": "did", "has": "have", "have": "have", "'ve": "have", "had": "had",
        "will": "will", "'ll": "will", "shall": "shall", "would": "would", "can": "can", "could": "could",
        "may": "may", "might": "might", "must": "must", "should": "should"}
_WHOLE = {"can't": ["can", "not"], "cannot": ["can", "not"], "won't": ["will", "not"], "shan't": ["shall", "not"],
          "whom": ["who"], "i'd": ["i", "would"], "an": ["a"]}
_IS_AFTER = {"who", "what", "when", "where", "why", "which", "how", "that", "there", "it", "he", "she"}  # X's = X is

_ONES = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                    "fourteen fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
_SCALES = {"hundred": 100, "dozen": 12, "thousand": 1000, "million": 1_000_000, "billion": 1_000_000_000}
_ORDINALS = {w: i for i, w in enumerate("first second third fourth fifth sixth seventh eighth ninth tenth eleventh "
                                        "twelfth".split(), 1)} | {"hundredth": 100, "thousandth": 1000,
                                                                 "millionth": 1_000_000}


def _table(rows: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for canon, words in rows.items():
        out.update(dict.fromkeys(words.split(), canon))
    return out


# Spelling variants of one word. Singular and plural stay apart (a different question: "which day" / "which
# days"); an abbreviation reads as the plural ("in km", "5 km").
_SPELLING = _table({
    "kilometre": "kilometre kilometer", "kilometres": "kilometres kilometers km kms",
    "metre": "metre meter", "metres": "metres meters", "centimetre": "centimetre centimeter",
    "centimetres": "centimetres centimeters cm cms", "millimetre": "millimetre millimeter",
    "millimetres": "millimetres millimeters mm", "feet": "feet ft", "kilogram": "kilogram kilogramme",
    "kilograms": "kilograms kilogrammes kg kgs kilos", "gram": "gram gramme", "grams": "grams grammes",
    "pounds": "pounds lbs", "litre": "litre liter", "litres": "litres liters", "millilitre": "millilitre milliliter",
    "millilitres": "millilitres milliliters ml", "hours": "hours hrs", "minutes": "minutes mins",
    "seconds": "seconds secs", "years": "years yrs", "percent": "percent %", "colour": "colour color",
    "colours": "colours colors", "grey": "grey gray", "programme": "programme program",
    "programmes": "programmes programs", "centre": "centre center", "centres": "centres centers",
    "harbour": "harbour harbor", "harbours": "harbours harbors", "celsius": "celsius centigrade",
})
_RATES = {"hourly": "hour", "daily": "day", "weekly": "week", "monthly": "month", "yearly": "year",
          "annually": "year"}
_RATE_WORDS = {"every", "each", "per"}
_RATE_UNITS = {"hour", "day", "week", "month", "year", "minute", "night", "morning", "evening"}


def question_form(text: str) -> Form | None:
    """(the question's words in canonical form and order, its first auxiliary verb), or None when nothing is left.

    Two questions with the same form ask the same thing; different forms may still be paraphrases.
    """
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    text = _THOUSANDS.sub(lambda m: m.group(1) + m.group(2).replace(",", ""), text)
    text = re.sub(r"\bper cent\b", "percent", text, flags=re.IGNORECASE)
    words = _rates(_numbers(_strip_frame(_split(_TOKEN.findall(text.lower())))))
    first_aux, out = "", []
    for w in words:
        if w in _DROP:
            continue
        if w in _AUX:
            if not first_aux:
                first_aux = _AUX[w]
                continue
            w = _AUX[w]
        out.append(_SPELLING.get(w, w))
    return (tuple(out), first_aux) if out else None


def _split(tokens: list[str]) -> list[str]:
    """Contractions into words: n't -> not, 's after a question word -> is (else a possessive), 're, 'll…"""
    out: list[str] = []
    for t in tokens:
        if t in _WHOLE:
            out += _WHOLE[t]
        elif t.endswith("n't"):
            out += [t[:-3], "not"]
        elif "'" in t:
            head, tail = t.split("'", 1)
            tail = "'" + tail
            if tail == "'s" and head not in _IS_AFTER:
                out += [head, "'s-of"]  # a possessive: a word of its own
            else:
                out += [head, tail if tail in _AUX else tail[1:]]
        else:
            out.append(t)
    return out


def _strip_frame(words: list[str]) -> list[str]:
    changed = True
    while changed:
        changed = False
        for frame in _FRAMES:
            if words[:len(frame)] == frame and len(words) > len(frame):
                words, changed = words[len(frame):], True
                break
    return words


def _numbers(words: list[str]) -> list[str]:
    """Written numbers as digits: 'nine hundred' -> 900, 'forty five' -> 45, 'one millionth' -> 1000000th."""
    out: list[str] = []
    i = 0
    while i < len(words):
        value, ordinal, j = _read_number(words, i)
        if j > i:
            out.append(f"{value}{_suffix(value)}" if ordinal else str(value))
            i = j
            continue
        w = words[i]
        if re.fullmatch(r"\d+(st|nd|rd|th)", w):
            w = f"{int(w[:-2])}{_suffix(int(w[:-2]))}"
        out.append(w)
        i += 1
    return out


def _read_number(words: list[str], i: int) -> tuple[int, bool, int]:
    """(value, whether it is an ordinal, index after it) of the written number at words[i]; j == i if none."""
    total = current = 0
    last = ""  # the previous number word: "one" (zero..nineteen), "ten" (twenty..ninety) or "scale"
    j = i
    while j < len(words):
        x = words[j]
        if x == "a" and j == i and j + 1 < len(words) and words[j + 1] in _SCALES:
            current, last = 1, "one"  # a hundred, a dozen
        elif x in _ONES and (last in ("", "scale") or (last == "ten" and 0 < _ONES[x] < 10)):
            current, last = current + _ONES[x], "one"
        elif x in _TENS and last in ("", "scale"):
            current, last = current + _TENS[x], "ten"
        elif x in _SCALES:
            current, last = max(current, 1) * _SCALES[x], "scale"
            if _SCALES[x] >= 1000:
                total, current = total + current, 0
        elif x in _ORDINALS and (last in ("", "scale") or _ORDINALS[x] >= 100
                                 or (last == "ten" and _ORDINALS[x] < 10)):
            value = _ORDINALS[x]
            current = max(current, 1) * value if value >= 100 else current + value
            return total + current, True, j + 1
        elif not (x == "and" and last == "scale" and j + 1 < len(words) and words[j + 1] in _ONES | _TENS):
            break
        j += 1
    return total + current, False, j


def _suffix(n: int) -> str:
    return "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def _rates(words: list[str]) -> list[str]:
    """'every week', 'each week', 'per week' and 'weekly' all become 'per week'."""
    out: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w in _RATES:
            out += ["per", _RATES[w]]
        elif w in _RATE_WORDS and i + 1 < len(words) and words[i + 1] in _RATE_UNITS:
            out += ["per", words[i + 1]]
            i += 1
        else:
            out.append(w)
        i += 1
    return out
