"""What must match before the response cache may call two questions the same: a canonical form and a key.

Sentence embeddings alone cannot tell "every week" from "every month", "who founded" from "when was … founded",
900 from 9000, "can" from "cannot", order QLW123456 from QLW654321 or -15 from 15: such near misses score a
MiniLM cosine of up to 0.996, higher than many true paraphrases (measured by bench/respcache.py). So the
semantic level serves an earlier answer only when both questions have the same canonical form AND the same
must-match key, and their embeddings agree as well.

The canonical form (`question_form`) keeps every word and symbol that can change what is asked, in order:
names, identifiers and codes (whole: Level3, order_1, v2.1, HL-2040, 10.0.0.12), numbers with their sign and
decimals, units, time words, question words, articles, negation, comparatives, verbs, prepositions, tense. It
forgets only what cannot: letter case, sentence punctuation, a polite frame ("can you tell me …", "please"),
where the first auxiliary verb stands ("when was X founded" / "when X was founded"; the auxiliary itself still
counts), contractions, how a whole number is written (nine hundred / 900, forty-five / 45, first / 1st),
the spelling of a few ordinary words (colour / color) and every / each / per before a time unit.

The must-match key (`must_match`) is taken from the question as typed, independently of the form's
normalising, and lists in order every token a user would expect to decide the answer, exactly as written:

* a token with a numeral or an underscore, or with a symbol other than a hyphen or apostrophe between two of
  its characters (identifiers, codes, versions, dates, times, addresses, decimals, 1,000, f(x), 5'10"): kept
  whole, case and leading zeros included; a quote or prime right after a digit stays with it. A minus sign
  written as '-', an en dash (U+2013), a minus (U+2212) or another hyphen dash right before a number becomes
  one '-' and is never dropped: -15, –15 and −15 are one question, 15 another. Digits are compared as
  written: 1,000 and 1000 differ (in much of Europe 1,000 is one), and so do 0.5 and .5, 007 and 7. A whole
  number written in words counts as its digits (nine hundred = 900, first = 1st).
* every symbol but sentence punctuation (. , ; : ! ? quotes, brackets): currency ($ € £ ¥), % ‰ °,
  comparison and arithmetic signs (< > ≤ ≥ = + ± × ÷), # / * ~ & @, a dash standing alone and the em dash
  (never read as a minus).
* a unit word or abbreviation (kg, lbs, pounds, km, miles, MB, hours, weekly, pm …) literally: no synonyms
  and no spelling variants, so lbs, pounds and kg, km and kilometres, % and percent are different questions.
* an all-capitals token or one with a capital after its first letter (QLW, USD, MB vs Mb, mW vs MW, iOS, XIV),
  and a lone capital letter (Building A / Building B) other than the pronoun I and a leading article A.
* negation: not (also n't and cannot), no, never, none, nor, neither, nobody, nothing, nowhere, without, non.

Two questions that differ in any of these never share an answer, whatever their embeddings say. The form and
the key never stem and know no synonyms: another word is another question. Reworded or reordered paraphrases
therefore miss, which costs one model run and never a wrong answer.
"""

from __future__ import annotations

import re

Form = tuple[tuple[str, ...], str]
Key = tuple[str, ...]

# '-' for the hyphen, non-breaking hyphen, figure dash, en dash, minus and small and full-width hyphen-minus,
# and the curly apostrophes as "'". The em dash and horizontal bar stay themselves: never read as a minus.
_SAME = str.maketrans(dict.fromkeys("\u2010\u2011\u2012\u2013\u2212\ufe63\uff0d", "-")
                      | {"\u2019": "'", "\u2018": "'"})
# a word, identifier or number (symbols between two of its characters join them: order_1, v2.1, 10:15,
# a@b.example, km/h, f(x; a leading minus or decimal point belongs to a number, and quotes or primes right
# after a digit are its unit: 5' and 5" are feet and inches), or one other character
_CHUNK = re.compile(r"(?:(?<![\w.])-(?=\.?\d))?(?:(?<!\w)\.(?=\d))?\w+(?:[^\w\s]+\w+)*"
                    r"(?:(?<=\d)['\"\u2032\u2033\u201d]+)?|[^\w\s]")
_SYMBOL = re.compile(r"[^\w\s]")
_CODE = re.compile(r"_|[^\w\s'-]")  # with a numeral: what makes a chunk an identifier or number
# sentence punctuation, which changes nothing asked; other symbols ($, %, °, <, #, -, em dash…) are tokens
_PUNCT = set(".,;:!?\"'`()[]{}…\u201c\u201d«»‹›¿¡"
             "。，、；：！？（）「」『』【】《》〈〉・")

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


# Spelling variants of one ordinary word. Singular and plural stay apart (a different question: "which day" /
# "which days"). Units are never equated, not even spellings of one (see the module docstring).
_SPELLING = _table({
    "colour": "colour color", "colours": "colours colors", "grey": "grey gray", "programme": "programme program",
    "programmes": "programmes programs", "centre": "centre center", "centres": "centres centers",
    "harbour": "harbour harbor", "harbours": "harbours harbors",
})
_RATE_WORDS = {"every", "each", "per"}
_RATE_UNITS = {"hour", "day", "week", "month", "year", "minute", "night", "morning", "evening"}

# Units of measure, time and money, and their abbreviations (matched in lower case, kept as written; symbols
# such as % and ° are key tokens anyway). "in", "a" and "second" are left out: as ordinary words the form
# keeps them apart, and "second" reads as the ordinal 2nd.
_UNITS = set("""
    mm cm dm m km nm µm μm inch inches ft feet foot yd yds yard yards mi mile miles
    metre metres meter meters kilometre kilometres kilometer kilometers km/h kmh kph mph knot knots
    centimetre centimetres centimeter centimeters millimetre millimetres millimeter millimeters micron microns
    mg µg μg mcg g gram grams gramme grammes kg kgs kilo kilos kilogram kilograms kilogramme kilogrammes
    t ton tons tonne tonnes lb lbs pound pounds oz ounce ounces stone stones
    ml cl dl l litre litres liter liters millilitre millilitres milliliter milliliters gal gallon gallons
    pint pints quart quarts cup cups tbsp tsp cc
    ms µs μs ns s sec secs seconds min mins minute minutes h hr hrs hour hours day days week weeks fortnight
    fortnights month months yr yrs year years decade decades century centuries am pm
    hourly daily nightly weekly fortnightly monthly quarterly yearly annually annual biweekly biannual
    degree degrees celsius centigrade fahrenheit kelvin
    b kb mb gb tb pb kib mib gib tib bit bits byte bytes kilobyte kilobytes megabyte megabytes gigabyte
    gigabytes terabyte terabytes bps kbps mbps gbps
    w kw mw gw kwh wh mwh j kj cal kcal calorie calories v mv kv volt volts amp amps ampere amperes ma mah
    watt watts hz khz mhz ghz ohm ohms pa kpa hpa psi bar atm db rpm ppm ppb mol
    percent percentage pct cent cents acre acres hectare hectares ha sqft px pt dpi
    dollar dollars usd euro euros eur gbp yen yuan rmb rupee rupees crown crowns krona kronor krone kroner
    franc francs peso pesos penny pence
""".split())
_NEGATIONS = {"not", "no", "never", "none", "nor", "neither", "nobody", "nothing", "nowhere", "without", "non"}


def _tokens(text: str) -> list[str]:
    """The question's tokens as typed: identifiers and numbers whole, other words split at hyphens, symbols one
    by one, sentence punctuation dropped. Every minus-like dash becomes '-'."""
    out: list[str] = []
    for chunk in _CHUNK.findall(text.translate(_SAME)):
        if _SYMBOL.fullmatch(chunk):
            if chunk not in _PUNCT:
                out.append(chunk)
        elif _is_code(chunk):
            out.append(chunk)
        else:
            out += [w for w in chunk.split("-") if w]
    return out


def _is_code(token: str) -> bool:
    """An identifier, code or number: a numeral, an underscore or a symbol inside."""
    return bool(_CODE.search(token)) or any(c.isnumeric() for c in token)


def question_form(text: str) -> Form | None:
    """(the question's words in canonical form and order, its first auxiliary verb), or None when nothing is left.

    Two questions with the same form ask the same thing up to what `must_match` checks; different forms may
    still be paraphrases.
    """
    words = _rates(_numbers(_strip_frame(_split([t.lower() for t in _tokens(text)]))))
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


def must_match(text: str) -> Key:
    """The tokens two questions must share exactly, in order, before one may take the other's answer: numbers,
    identifiers, codes, symbols, units, capitals and negation, as the module docstring lists them."""
    words = _tokens(text)
    lower = [w.lower() for w in words]
    out: list[str] = []
    i = 0
    while i < len(words):
        value, ordinal, j = _read_number(lower, i)
        if j > i:  # a written number: its digits, as the same number in digits gives
            out.append(f"{value}{_suffix(value)}" if ordinal else str(value))
            i = j
            continue
        w, low = words[i], lower[i]
        if low.endswith("n't") or low == "cannot":
            out.append("not")
        elif (low in _NEGATIONS or low in _UNITS or _is_code(w) or not w[0].isalnum()
              or any(c.isupper() for c in w[1:])
              or (len(w) == 1 and w.isupper() and w != "I" and not (i == 0 and w == "A"))):
            out.append(w)
        i += 1
    return tuple(out)


def question_key(text: str) -> tuple[Form, Key] | None:
    """What the semantic level indexes a question by: (canonical form, must-match key), None without words."""
    form = question_form(text)
    return (form, must_match(text)) if form else None


def _split(tokens: list[str]) -> list[str]:
    """Contractions into words: n't -> not, 's after a question word -> is (else a possessive), 're, 'll…
    Identifiers and numbers stay whole (5'10" is a height, not a contraction)."""
    out: list[str] = []
    for t in tokens:
        if _is_code(t):
            out.append(t)
        elif t in _WHOLE:
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
    big = 0  # the last scale of a thousand or more: the next one must be smaller
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
            scale = _SCALES[x]
            if (scale >= 1000 and big and scale >= big) or (scale < 1000 and current >= 100):
                break  # "a thousand thousand", "one hundred five hundred": not one number
            current, last = max(current, 1) * scale, "scale"
            if scale >= 1000:
                total, current, big = total + current, 0, scale
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
    """'every week', 'each week' and 'per week' all become 'per week'."""
    out: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w in _RATE_WORDS and i + 1 < len(words) and words[i + 1] in _RATE_UNITS:
            out += ["per", words[i + 1]]
            i += 1
        else:
            out.append(w)
        i += 1
    return out
