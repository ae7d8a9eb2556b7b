"""Writes the response-cache question pairs: near_miss.jsonl, identifier_near_miss.jsonl and paraphrase.jsonl.

    python examples/respcache/make_sets.py

Near misses ask something different with almost the same words: one changed entity, number (digits or
words), unit or time word, question word, negation, comparison, attribute, verb, order of the parties,
tense or ordinal. Identifier near misses differ only in an identifier or code (Level3 / Level2, order_1 /
order_7, v2.1 / v2.10), a sign (-15, with an en dash or a minus, / 15), a decimal, a unit or the token for
it (lbs / pounds), a currency, a date or time, a symbol or a negation. A response cache must never answer
one with the other's answer. Paraphrases ask
exactly the same thing in other words; a semantic cache should answer them from each other. The facts
are fictional, in the style of examples/sample_kb (Quillfeather Lantern Works) plus a few neighbours
(the Zephyr Guild, the Brackwater mill, the Saltmere ferry). Each row: {"a", "b", "kind"}.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _swap(template: str, kind: str, *pairs: tuple[str, str]) -> list[dict]:
    """One near-miss row per (x, y): the template filled with x and with y."""
    return [{"a": template.format(x), "b": template.format(y), "kind": kind} for x, y in pairs]


def _listed(*rows: tuple[str, str, str]) -> list[dict]:
    """Hand-written near misses: (a, b, kind)."""
    return [{"a": a, "b": b, "kind": kind} for a, b, kind in rows]


def near_misses() -> list[dict]:
    rows: list[dict] = []
    # -- a different named entity -----------------------------------------------------------------
    rows += _swap("How much does the {} lantern cost?", "entity", ("Heron", "Wren"), ("Wren", "Albatross"))
    rows += _swap("Who founded the {}?", "entity", ("Zephyr Guild", "Zephyr Company"),
                  ("Zephyr Guild", "Mistral Guild"), ("Saltmarsh Workshop", "Tinder Lane Workshop"))
    rows += _swap("What is the warranty on the {} storm lantern?", "entity", ("Albatross", "Petrel"))
    rows += _swap("When did {} become chief executive?", "entity", ("Marrek Solvang", "Ilse Varnocky"),
                  ("Marrek Solvang", "Marrek Solberg"))
    rows += _swap("How long does the ferry from {} to the northern islands take?", "entity",
                  ("Brackwater Cove", "Oskarvik"))
    rows += _swap("Which farm supplies the seagrass for the {} crates?", "entity", ("Heron", "Albatross"))
    rows += _swap("Who approves expense claims for the {} Workshop?", "entity", ("Saltmarsh", "Tinder Lane"))
    rows += _swap("Where is {} buried?", "entity", ("Odalys Renn", "Amund Fell"))
    rows += _swap("How many pilot boats does the {} Harbour Authority run?", "entity", ("Northwind", "Southwind"))
    rows += _swap("what colour is the {} lantern", "entity", ("heron", "wren"))  # typed in lower case
    rows += _swap("Is the {} lantern waterproof?", "entity", ("Wren", "Heron"))
    rows += _swap("What did the Golden Wick jury say about the {}?", "entity", ("Albatross", "Heron"))
    # -- a different number, in digits or in words --------------------------------------------------
    rows += _swap("What happened at Quillfeather in {}?", "number", ("1994", "1995"), ("2011", "2016"))
    rows += _swap("Who must approve expense claims above {} crowns?", "number", ("900", "90"), ("900", "9000"))
    rows += _swap("Which lantern costs {} crowns?", "number", ("148", "184"), ("62", "310"))
    rows += _swap("What do members get for {} Moth Club points?", "number", ("500", "5000"), ("500", "50"))
    rows += _swap("Is shipping free on orders of more than {} crowns?", "number", ("600", "500"))
    rows += _swap("What discount do wholesale customers get for {} lanterns a year?", "number", ("50", "100"))
    rows += _swap("How many crowns is a {}-litre bottle of Clearflame?", "number", ("one", "five"), ("one", "two"))
    rows += _swap("Who sits in seat {} of the Zephyr Guild council?", "number", ("7", "17"), ("3", "8"))
    rows += _swap("What is the penalty for returning a lantern after {} days?", "number",
                  ("forty-five", "forty-six"), ("45", "54"), ("45", "four"))
    rows += _swap("How many employees have more than {} years of service?", "number",
                  ("ten", "twenty"), ("ten", "eleven"), ("10", "twelve"))
    rows += _swap("How many lanterns were sold in the first {} months of 2024?", "number", ("three", "six"),
                  ("two", "3"))
    rows += _swap("What is the price of {} Heron lanterns?", "number", ("two", "three"), ("a dozen", "twenty"))
    rows += _swap("How long is the tour for children under {}?", "number", ("twelve", "ten"), ("12", "two"))
    rows += _swap("Which shelf holds {} brass hinges?", "number", ("3.2", "32"), ("1,000", "100"))
    # -- a different unit or time word --------------------------------------------------------------
    rows += _swap("How many sacks does the mill produce every {}?", "unit", ("week", "month"),
                  ("month", "year"), ("day", "week"))
    rows += _swap("How many sacks of flour does the Brackwater mill grind per {}?", "unit", ("hour", "day"))
    rows += _swap("How far is Oskarvik from Brackwater Cove in {}?", "unit", ("kilometres", "miles"))
    rows += _swap("How much does the Heron lantern weigh in {}?", "unit", ("kilograms", "pounds"))
    rows += _swap("How tall is the Wren lantern in {}?", "unit", ("centimetres", "inches"))
    rows += _swap("What does a Heron lantern cost in {}?", "unit", ("crowns", "euros"))
    rows += _swap("How many lanterns did Quillfeather ship last {}?", "unit", ("week", "year"))
    rows += _swap("When does the ferry to the islands sail on {}?", "unit", ("Wednesdays", "Thursdays"),
                  ("Mondays", "Fridays"))
    rows += _swap("Which lanterns were launched in {} 2021?", "unit", ("March", "May"), ("spring", "autumn"))
    rows += _swap("How long does the {} shift at the mill last?", "unit", ("morning", "evening"))
    rows += _swap("What is on the workshop schedule for {}?", "unit", ("today", "tomorrow"))
    rows += _swap("How many {} of oil does the Heron burn per night?", "unit", ("litres", "millilitres"))
    rows += _swap("How long does the Wren's battery last in {}?", "unit", ("hours", "minutes"))
    rows += _swap("What is the maximum depth of the Albatross in {}?", "unit", ("metres", "feet"))
    rows += _swap("How much rain fell on Brackwater Cove this {}?", "unit", ("week", "month"))
    rows += _swap("How hot does the furnace get in degrees {}?", "unit", ("Celsius", "Fahrenheit"))
    rows += _swap("What percentage of orders ship {}?", "unit", ("weekly", "monthly"))
    rows += _swap("How many {} of paid leave does an employee get?", "unit", ("days", "weeks"))
    # -- a different question word ------------------------------------------------------------------
    rows += _listed(
        ("Who founded the Zephyr Guild?", "When was the Zephyr Guild founded?", "question word"),
        ("Who founded the Zephyr Guild?", "Where was the Zephyr Guild founded?", "question word"),
        ("Why was the Zephyr Guild founded?", "When was the Zephyr Guild founded?", "question word"),
        ("How many lanterns does the Northwind Harbour Authority buy?",
         "How much does the Northwind Harbour Authority pay for lanterns?", "question word"),
        ("Where was the one millionth lantern delivered?",
         "When was the one millionth lantern delivered?", "question word"),
        ("Who delivered the one millionth lantern?", "Where was the one millionth lantern delivered?", "question word"),
        ("How long does a repair take?", "How much does a repair cost?", "question word"),
        ("How tall is the Heron lantern?", "How heavy is the Heron lantern?", "question word"),
        ("How old is Marrek Solvang?", "How tall is Marrek Solvang?", "question word"),
        ("Which lantern won the Golden Wick award?",
         "Why did the Albatross win the Golden Wick award?", "question word"),
        ("When does the order desk answer messages?", "Who answers messages at the order desk?", "question word"),
        ("How often does the ferry sail to the islands?", "When does the ferry sail to the islands?", "question word"),
        ("Why is the Heron blue?", "How is the Heron blue?", "question word"),
        ("How far is the Saltmarsh Workshop from the harbour?", "How long is the walk from the harbour to "
         "the Saltmarsh Workshop?", "question word"),
        ("What did Odalys Renn open in 1987?", "Where did Odalys Renn open a studio in 1987?", "question word"),
        ("Whose lantern was sold to the lighthouse keeper?", "Which lantern was sold to the lighthouse "
         "keeper?", "question word"),
        ("How many people does Quillfeather employ?", "Who does Quillfeather employ?", "question word"),
        ("Who is the head of design?", "Who was the head of design?", "tense"),
    )
    rows += _swap("{} did the Brackwater mill close for repairs?", "question word", ("When", "Why"),
                  ("How long", "How often"))
    # -- negation -----------------------------------------------------------------------------------
    rows += _listed(
        ("Which lanterns can be returned?", "Which lanterns cannot be returned?", "negation"),
        ("Can workshop staff work remotely?", "Can't workshop staff work remotely?", "negation"),
        ("Which staff may enter the furnace room?", "Which staff may not enter the furnace room?", "negation"),
        ("Is the Wren waterproof?", "Is the Wren not waterproof?", "negation"),
        ("Which products come with a warranty?", "Which products come without a warranty?", "negation"),
        ("Who has ever won the Golden Wick award?", "Who has never won the Golden Wick award?", "negation"),
        ("What should I use to clean the glass?", "What should I never use to clean the glass?", "negation"),
        ("Which orders ship with a charge?", "Which orders ship free of charge?", "negation"),
    )
    # -- comparison ---------------------------------------------------------------------------------
    rows += _listed(
        ("Which lantern is the tallest?", "Which lantern is the shortest?", "comparison"),
        ("Which lantern is the most expensive?", "Which lantern is the least expensive?", "comparison"),
        ("Which lantern is taller than the Wren?", "Which lantern is shorter than the Wren?", "comparison"),
        ("Who is the largest wholesale customer?", "Who is the smallest wholesale customer?", "comparison"),
        ("Which lantern has the longest warranty?", "Which lantern has the shortest warranty?", "comparison"),
        ("Which lantern is heavier than the Heron?", "Which lantern is lighter than the Heron?", "comparison"),
        ("Which workshop is older?", "Which workshop is newer?", "comparison"),
        ("Which shipping option is cheapest?", "Which shipping option is fastest?", "comparison"),
        ("Who has more years of service than Ilse Varnocky?", "Who has fewer years of service than Ilse Varnocky?",
         "comparison"),
    )
    # -- another attribute, verb, tense or order of the parties ----------------------------------------
    rows += _swap("What is the {} of the Heron lantern?", "attribute", ("price", "weight"), ("height", "warranty"),
                  ("colour", "price"))
    rows += _swap("Who is the {} of Quillfeather?", "attribute", ("founder", "chief executive"),
                  ("head of design", "finance director"))
    rows += _swap("Who {} the first Heron lantern?", "verb", ("bought", "sold"), ("made", "designed"))
    rows += _swap("When did Quillfeather {} the Wren lantern?", "verb", ("launch", "discontinue"),
                  ("launch", "redesign"))
    rows += _swap("Who {} the Zephyr Guild?", "verb", ("founded", "leads"), ("founded", "left"))
    rows += _swap("Which town {} the most lanterns?", "verb", ("buys", "makes"))
    rows += _listed(
        ("Who did Odalys Renn hire?", "Who hired Odalys Renn?", "order"),
        ("Who did Marrek Solvang take over from?", "Who took over from Marrek Solvang?", "order"),
        ("Does Quillfeather buy seagrass from the Mirelle farm?",
         "Does the Mirelle farm buy seagrass from Quillfeather?", "order"),
        ("Which guild did the Zephyr Guild merge into?", "Which guild merged into the Zephyr Guild?", "order"),
        ("Who is the current chief executive?", "Who was the first chief executive?", "tense"),
        ("How many people does Quillfeather employ?", "How many people did Quillfeather employ?", "tense"),
        ("Where will the next lantern fair be held?", "Where was the last lantern fair held?", "tense"),
        ("Who bought the first Heron lantern?", "Who bought the second Heron lantern?", "ordinal"),
        ("When is the fire drill held on the first Tuesday?", "When is the fire drill held on the last "
         "Tuesday?", "ordinal"),
        ("Who won the Golden Wick award in its first year?", "Who won the Golden Wick award in its third "
         "year?", "ordinal"),
    )
    return rows


def paraphrases() -> list[dict]:
    """Pairs asking exactly the same thing: same facts sought, same scope, same units and time."""
    p = [
        # politeness and framing around the same question
        ("Who founded the Zephyr Guild?", "Can you tell me who founded the Zephyr Guild?"),
        ("How many sacks does the mill produce every week?", "Could you tell me how many sacks the mill produces "
         "every week?"),
        ("When was Quillfeather founded?", "Do you know when Quillfeather was founded?"),
        ("What is the company motto?", "Please tell me the company motto."),
        ("Who is the current chief executive?", "Who is the current chief executive, please?"),
        ("How long is parental leave?", "Quick question: how long is parental leave?"),
        ("Where is the Saltmarsh Workshop?", "I'd like to know where the Saltmarsh Workshop is."),
        ("What is the warranty on the Wren lantern?", "Tell me the warranty on the Wren lantern."),
        # contractions, punctuation, case, articles
        ("What is the warranty on the Albatross storm lantern?", "What's the warranty on the Albatross storm "
         "lantern?"),
        ("Who is the head of design?", "Who's the head of design?"),
        ("Can workshop staff work remotely?", "can workshop staff work remotely"),
        ("When does the monthly fire drill take place?", "When does the monthly fire drill take place??"),
        ("Why is the Heron blue?", "why is the heron blue"),
        ("What does the Wren lantern weigh?", "What does a Wren lantern weigh?"),
        ("How long does a repair normally take?", "How long does the repair normally take?"),
        ("Which award did the company win in 2011?", "Which award did the company win in 2011 ?"),
        ("Who must approve expense claims above 900 crowns?", "Who must approve expense claims above 900 crowns!?"),
        ("Is there a loyalty programme?", "Is there a loyalty programme ?"),
        # numbers written another way
        ("Who must approve expense claims above 900 crowns?", "Who must approve expense claims above nine hundred "
         "crowns?"),
        ("How much does a one-litre bottle of Clearflame cost?", "How much does a 1-litre bottle of Clearflame "
         "cost?"),
        ("What do members get for 500 Moth Club points?", "What do members get for five hundred Moth Club points?"),
        ("Which shelf holds 1,000 brass hinges?", "Which shelf holds 1000 brass hinges?"),
        ("What discount do wholesale customers get for 50 lanterns a year?", "What discount do wholesale customers "
         "get for fifty lanterns a year?"),
        ("How long is the tour for children under 12?", "How long is the tour for children under twelve?"),
        ("What is the penalty for returning a lantern after 45 days?", "What is the penalty for returning a lantern "
         "after forty-five days?"),
        # units and time words written another way
        ("How many sacks does the mill produce every week?", "How many sacks does the mill produce per week?"),
        ("How many sacks does the mill produce every month?", "How many sacks does the mill produce each month?"),
        ("How many sacks does the mill produce per year?", "How many sacks does the mill produce a year?"),
        ("How tall is the Heron lantern in centimetres?", "How tall is the Heron lantern in centimeters?"),
        ("How far is Oskarvik from Brackwater Cove in kilometres?", "How far is Oskarvik from Brackwater Cove in "
         "km?"),
        ("How much does the Heron lantern weigh in kilograms?", "How much does the Heron lantern weigh in kg?"),
        ("What colour is the Heron lantern?", "What color is the Heron lantern?"),
        ("How many lanterns does the Northwind Harbour Authority buy every year?", "How many lanterns does the "
         "Northwind Harbour Authority buy annually?"),
        # other words, same question
        ("How much does the Heron lantern cost?", "What is the price of the Heron lantern?"),
        ("How much does the Heron lantern cost?", "How much is the Heron lantern?"),
        ("Who founded the Zephyr Guild?", "Who was the founder of the Zephyr Guild?"),
        ("Who founded the Zephyr Guild?", "By whom was the Zephyr Guild founded?"),
        ("How many people does Quillfeather employ?", "How many employees does Quillfeather have?"),
        ("When was Quillfeather founded?", "In what year was Quillfeather founded?"),
        ("Where is the Brackwater mill?", "Where is the Brackwater mill located?"),
        ("What is the name of the company mascot?", "What is the company mascot called?"),
        ("How long is parental leave?", "How long does parental leave last?"),
        ("Who is the current chief executive?", "Who is the current CEO?"),
        ("Can workshop staff work remotely?", "Are workshop staff allowed to work remotely?"),
        ("Who bought the first Heron lantern?", "Who was the first buyer of a Heron lantern?"),
        ("How many sacks does the mill produce every week?", "How many sacks does the mill make every week?"),
        ("Who is Quillfeather's finance director?", "Who is the finance director of Quillfeather?"),
        ("How long does the Wren lantern's battery last?", "How long does the battery of the Wren lantern last?"),
        ("In which town was the one millionth lantern delivered?", "Which town received the one millionth "
         "lantern?"),
        ("How many hours is the standard working week?", "How many hours are in the standard working week?"),
        ("Who approves expense claims above 900 crowns?", "Who has to approve expense claims above 900 crowns?"),
        ("How many sacks does the mill produce every week?", "Every week, how many sacks does the mill produce?"),
        ("Which lantern is the most expensive?", "What is the most expensive lantern?"),
        ("Does the Wren work outdoors?", "Can the Wren be used outdoors?"),
        ("How do I clean the glass?", "How should I clean the glass?"),
        ("What is the warranty on the Albatross storm lantern?", "How long is the warranty on the Albatross storm "
         "lantern?"),
        ("Who designed the Heron lantern?", "Who was the Heron lantern designed by?"),
        ("How tall is the Wren lantern?", "What is the height of the Wren lantern?"),
        ("How many days of paid annual leave does an employee get?", "How many days of paid annual leave does "
         "each employee get?"),
        ("What happened at Quillfeather in 1994?", "What happened at Quillfeather in the year 1994?"),
    ]
    return [{"a": a, "b": b, "kind": "paraphrase"} for a, b in p]


def identifier_near_misses() -> list[dict]:
    """Pairs that differ only in an identifier, code, number, sign, decimal, unit, symbol, date, time, letter case
    of an abbreviation or a negation: what a user expects to decide the answer however alike the sentences are.
    A unit counts as another question unless it is the same token (lbs / pounds too)."""
    rows: list[dict] = []
    # -- identifiers and codes: digits, underscores, dots, dashes, @ inside one token -------------------
    rows += _swap("Who can open a {} ticket?", "identifier", ("Level3", "Level2"), ("Level1", "Level10"))
    rows += _swap("What is the status of order {}?", "identifier", ("QLW123456", "QLW654321"),
                  ("QLW-2041", "QLW-2014"))
    rows += _swap("Which room holds the {} cylinders?", "identifier", ("H2", "H9"))
    rows += _swap("What changed in {} of the Quillfeather order API?", "identifier", ("v2", "v3"),
                  ("v2.1", "v2.10"))
    rows += _swap("Which customer placed {} in the Quillfeather shop database?", "identifier",
                  ("order_1", "order_7"), ("order_12", "order_21"))
    rows += _swap("Where is workshop bay {}?", "identifier", ("B12", "B21"))
    rows += _swap("Which lantern has the part number {}?", "identifier", ("HL-2040", "HL-2041"))
    rows += _swap("What does error code {} on the Wren charger mean?", "identifier", ("E404", "E405"))
    rows += _swap("Who is assigned to ticket {}?", "identifier", ("#1204", "#1240"))
    rows += _swap("When does the ferry {} leave Brackwater Cove?", "identifier", ("SF7", "SF17"))
    rows += _swap("What is stored in crate {} on the top shelf?", "identifier", ("12A", "12B"))
    rows += _swap("What does the {} build of the lantern firmware include?", "identifier", ("x86_64", "x86_32"))
    rows += _swap("What is the address {} used for in the workshop network?", "identifier",
                  ("10.0.0.12", "10.0.0.21"))
    rows += _swap("What does firmware {} fix on the Wren lantern?", "identifier", ("2.1.3", "2.1.4"))
    rows += _swap("Who reads the mail sent to {}?", "identifier",
                  ("sales1@quillfeather.example", "sales2@quillfeather.example"))
    rows += _swap("How much does the Heron {} weigh?", "identifier", ("Mk2", "Mk3"))
    rows += _swap("Which warehouse ships the orders from zone {}?", "identifier", ("A3", "A8"))
    rows += _swap("Who owns the lantern with serial number {}?", "identifier", ("00417", "00471"), ("007", "7"))
    rows += _swap("What is stored under the redis key {}?", "identifier", ("user:42", "user:24"))
    rows += _swap("Who skippers the pilot boat {}?", "identifier", ("PB-07", "PB-70"))
    rows += _swap("Is the Heron glass safe to clean with {}?", "identifier", ("H2O2", "H2O"))
    rows += _swap("Which depot serves the postcode {}?", "identifier", ("BC4 7QL", "BC4 7QK"))
    rows += _swap("What is the balance of account {}?", "identifier", ("0012-3456", "0012-3465"))
    rows += _swap("Where is meeting room {}?", "identifier", ("2.14", "2.41"))
    rows += _swap("Who answers extension {} at the order desk?", "identifier", ("204", "402"))
    rows += _swap("Which lanterns does Plan {} cover?", "identifier", ("A", "B"))
    rows += _swap("Which staff may use {}?", "identifier", ("Kiln-1", "Kiln-2"))
    # -- a sign: '-', en dash or minus against none, or another sign -------------------------------------
    rows += _swap("Does the Wren lantern work at {} degrees?", "sign", ("\u201315", "15"), ("\u221215", "15"),
                  ("-15", "15"), ("+40", "-40"))
    rows += _swap("What happens to the Albatross glass at {} °C?", "sign", ("\u221240", "40"))
    rows += _swap("Is the cold store kept at {} degrees Celsius?", "sign", ("-18", "18"))
    rows += _swap("Which quarter had a growth of {} percent?", "sign", ("\u22122.5", "2.5"))
    rows += _swap("Which account shows a balance of {} crowns?", "sign", ("\u2013120", "120"))
    rows += _swap("Which offices use the time zone {}?", "sign", ("UTC+2", "UTC-2"))
    # -- a decimal, or digits grouped another way ---------------------------------------------------------
    rows += _swap("Which lantern weighs {} kg?", "decimal", ("1.5", "15"), ("1.5", "1.05"))
    rows += _swap("What costs {} crowns in the workshop shop?", "decimal", ("2.50", "2.05"))
    rows += _swap("Which shelf holds {} brass hinges?", "decimal", ("1,000", "1.000"), ("3,5", "35"))
    rows += _swap("Which bottle holds {} litres of Clearflame?", "decimal", ("0.5", "5"), ("0.75", "0.57"))
    rows += _swap("Is a tolerance of {} mm acceptable for the Heron hinge?", "decimal", ("0.01", "0.1"))
    # -- a unit: another unit, or another token for it -----------------------------------------------------
    rows += _swap("How much does the Heron lantern weigh in {}?", "unit", ("lbs", "pounds"), ("kg", "lbs"),
                  ("kg", "kilograms"), ("oz", "grams"))
    rows += _swap("How far is Oskarvik from Brackwater Cove in {}?", "unit", ("km", "mi"), ("km", "kilometres"))
    rows += _swap("What is the highest temperature the Wren can take in {}?", "unit", ("°C", "°F"),
                  ("Celsius", "Fahrenheit"))
    rows += _swap("How fast does the Saltmere ferry go in {}?", "unit", ("knots", "mph"), ("km/h", "m/s"))
    rows += _swap("How big is the Wren firmware image in {}?", "unit", ("KB", "KiB"), ("MB", "Mb"))
    rows += _swap("How long does the Wren battery last in {}?", "unit", ("hrs", "mins"))
    rows += _swap("How much Clearflame does one bottle hold in {}?", "unit", ("ml", "fl oz"))
    rows += _swap("Is the Heron lantern 30 {} tall?", "unit", ("cm", "mm"))
    rows += _swap("Is the Wren charger rated at 5 {}?", "unit", ("mW", "MW"), ("W", "V"))
    rows += _swap("Which orders get a 15{} discount?", "unit", ("%", " percent"), ("%", " crown"))
    # -- money: another currency or amount -----------------------------------------------------------------
    rows += _swap("Which lanterns cost under {}?", "currency", ("$50", "€50"), ("$50", "£50"), ("$50", "$500"),
                  ("¥5000", "¥500"), ("$50", "50"))
    rows += _swap("Which customers pay their invoices in {}?", "currency", ("USD", "CAD"))
    # -- dates and times ------------------------------------------------------------------------------------
    rows += _swap("What happened at the Saltmarsh Workshop on {}?", "date", ("2024-03-05", "2024-05-03"),
                  ("03/05/2024", "05/03/2024"), ("March 5", "March 6"), ("5 March", "6 March"))
    rows += _swap("Who was on shift at the order desk at {} on Monday?", "time", ("10:15", "10:51"),
                  ("5 pm", "5 am"))
    rows += _swap("How many lanterns were sold in {} 2023?", "date", ("Q1", "Q2"))
    rows += _swap("What was Quillfeather's revenue in {}?", "date", ("FY24", "FY25"))
    rows += _swap("Which lanterns were popular in the {}?", "date", ("1990s", "1980s"))
    rows += _swap("Which orders arrived on the {} of May?", "date", ("5th", "6th"))
    # -- comparison signs and negation ---------------------------------------------------------------------
    rows += _swap("Which lanterns have a rating {} 4?", "symbol", (">", "<"), (">", ">="))
    rows += _swap("Which expense claims are {} 900 crowns?", "symbol", ("≥", "≤"))
    rows += _listed(
        ("Is smoking allowed in the Saltmarsh Workshop?", "Is smoking not allowed in the Saltmarsh Workshop?",
         "negation"),
        ("Which lanterns need batteries?", "Which lanterns need no batteries?", "negation"),
        ("Which staff are allowed to use the kiln?", "Which staff aren't allowed to use the kiln?", "negation"),
        ("Which Heron lanterns were sold with a warranty?", "Which Heron lanterns were sold without a warranty?",
         "negation"),
        ("Which orders are refundable?", "Which orders are non-refundable?", "negation"),
    )
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    near, ident, para = near_misses(), identifier_near_misses(), paraphrases()
    for rows in (near, ident, para):
        assert all(r["a"] != r["b"] for r in rows)
        assert len({(r["a"], r["b"]) for r in rows}) == len(rows)
    write(HERE / "near_miss.jsonl", near)
    write(HERE / "identifier_near_miss.jsonl", ident)
    write(HERE / "paraphrase.jsonl", para)
    print(f"{len(near)} near-miss pairs, {len(ident)} identifier near-miss pairs, {len(para)} paraphrase pairs")


if __name__ == "__main__":
    main()
