"""Sources and support: passages with locators a person can follow, facts checked against them, and a
passage index stored, verified and shared with the cache it belongs to."""

from __future__ import annotations

import pytest

import cag
from cag.cache import kvfile, stores
from cag.errors import CacheFileError
from cag.kb import grounding, knowledge, passages
from cag.kb.grounding import REFUSAL, Citer, GroundingError
from conftest import SAMPLE_DOCS
from pdfutil import write_pdf
from storeutil import redis_server, redis_url  # noqa: F401 - fixtures
from cacheutil import resave


@pytest.fixture(scope="module")
def sample():
    docs = knowledge.load([SAMPLE_DOCS])
    return docs, Citer(passages.PassageIndex.build(docs, knowledge.content_hash(docs)))


def _passage(citer: Citer, needle: str) -> passages.Passage:
    (hit,) = [p for p, t in zip(citer.index.passages, citer.index.texts) if needle in t]
    return hit


def test_passages_are_short_spans_of_their_documents(sample):
    docs, citer = sample
    text = {d.name: d.text for d in docs}
    assert {p.document for p in citer.index.passages} == set(text)
    for p, shown in zip(citer.index.passages, citer.index.texts):
        assert len(shown) <= passages.MERGED_CHARS and shown == passages.shown(text[p.document][p.start:p.end])
    covered = " ".join(citer.index.texts)
    for fact in ("27 days", "Odalys Renn", "Amund Fell", "Light that outlasts the storm", "74 centimetres"):
        assert fact in covered


@pytest.mark.parametrize("tail", ["Short end.", "A longer last sentence that stands as a passage of its own. " * 3])
def test_a_long_block_is_cut_at_sentences_and_a_short_end_joins_the_piece_before(tail):
    text = "# Guide\n" + "The Heron lantern is blue and costs 148 crowns in every shop. " * 5 + tail
    doc = knowledge.Document("guide.md", knowledge.normalize(text))
    got = passages.split(doc)
    assert len(got) == (1 if tail == "Short end." else 2)
    assert all(len(doc.text[p.start:p.end]) <= passages.MERGED_CHARS for p in got)
    assert doc.text[got[-1].start:got[-1].end].endswith(tail.strip())


def test_markdown_passages_name_their_heading_path(sample):
    _, citer = sample
    leave = _passage(citer, "27 days")
    assert leave.heading == ("Employee Handbook — Policies", "Leave") and leave.page is None
    assert leave.locator == "Employee Handbook — Policies › Leave"


def test_plain_text_passages_name_the_lines_they_span(sample):
    docs, citer = sample
    fell = _passage(citer, "Amund Fell")
    lines = (SAMPLE_DOCS / fell.document).read_text().split("\n")[fell.lines[0] - 1:fell.lines[1]]
    assert fell.document.endswith(".txt") and any("Amund Fell" in line for line in lines)
    assert fell.locator == f"lines {fell.lines[0]}-{fell.lines[1]}" and not fell.heading


def test_a_pdf_source_names_its_page(tmp_path):
    pages = [b"BT /F1 12 Tf 72 720 Td (The Heron lantern costs 148 crowns.) Tj ET",
             b"BT /F1 12 Tf 72 720 Td (Nothing here.) Tj ET" * 0,  # an empty page still counts
             b"BT /F1 12 Tf 72 720 Td (The Wren battery lasts 40 hours.) Tj ET"]
    pdf = write_pdf(tmp_path / "guide.pdf", pages)
    docs = knowledge.load([pdf])
    citer = Citer(passages.PassageIndex.build(docs, knowledge.content_hash(docs)))
    got = citer.ground("How long does the Wren battery last?", "The Wren battery lasts 40 hours.")
    assert got.sources[0].page == 3 and got.sources[0].locator == "page 3" and got.supported
    assert citer.ground("What does the Heron cost?", "148 crowns.").sources[0].page == 1


@pytest.mark.parametrize("answer, supported", [
    ("Every employee receives 27 days of paid annual leave.", True),
    ("The company offers 12 months of paid annual leave.", False),  # a number the sources lack
    ("Employees get 27 weeks of paid annual leave.", False),  # the number with another unit
    ("Parental leave is twenty weeks at full pay.", True),  # number words read as digits
    ('The motto is "Light that outlasts the storm".', True),
    ('The motto is "Light that outlasts the darkness".', False),  # a quote the sources do not hold
    ("Tobiah Quenn approves them.", True),
    ("Marta Lindqvist approves them.", False),  # a name the sources do not hold
    ("I do not know.", False),  # nothing to check
    ("Zorblat quenched vorpals.", False),  # not one word the knowledge base has
])
def test_support_is_whether_the_sources_hold_the_answers_facts(sample, answer, supported):
    _, citer = sample
    got = citer.ground("What does the handbook say?", answer)
    assert got.supported is supported, (answer, got.support, got.sources[:1])
    assert 0.0 <= got.support <= 1.0 and (got.support >= grounding.SUPPORTED_AT) is supported


def test_what_the_question_already_says_is_not_evidence(sample):
    _, citer = sample
    q = "How many days of paid annual leave does an employee get?"
    assert not citer.ground(q, "An employee gets 12 days of paid annual leave.").supported
    assert citer.ground(q, "An employee gets 27 days of paid annual leave.").supported
    assert grounding.facts(q, "An employee gets paid annual leave.") == []


REGISTER = [
    knowledge.Document("towns.md", "# Towns\n\nJormirford was founded in 1301. The river Varro flows through "
                                   "Jormirford.\n\nYendumcrag was founded in 1707. The river Yolde flows through "
                                   "Yendumcrag."),
    knowledge.Document("people.md", "# Residents\n\nSelfen Broaesel is a cooper who lives in Jormirford.\n\n"
                                    "Pelce Pelzordum is a glassblower who lives in Yendumcrag.\n\n"
                                    "Kaka Tovishka is a weaver who lives in Yendumcrag."),
    knowledge.Document("guilds.md", "# Guilds\n\nThe Xalce Guild was founded in 1872 by Yendum Nikstoka.\n\n"
                                    "The Mirae Guild was founded in 1914 by Kayen Thaishsto."),
]


@pytest.mark.parametrize("question, answer, supported", [
    ("Who founded The Mirae Guild?", "Kayen Thaishsto founded it.", True),
    ("Who founded The Mirae Guild?", "Yendum Nikstoka founded it.", False),  # the founder of another guild
    ("What is the profession of Selfen Broaesel?", "Selfen Broaesel is a cooper.", True),
    ("What is the profession of Selfen Broaesel?", "Selfen Broaesel is a glassblower.", False),  # another's
    ("Which river flows through the town where Selfen Broaesel lives?", "The Varro.", True),  # two hops
    ("Which river flows through the town where Selfen Broaesel lives?", "The Yolde.", False),
    ("What is the profession of Ilse Varnocky?", "Ilse Varnocky is a cooper.", False),  # nobody of that name
])
def test_a_fact_of_another_subject_does_not_support_the_answer(question, answer, supported):
    citer = Citer(passages.PassageIndex.build(REGISTER, knowledge.content_hash(REGISTER)))
    got = citer.ground(question, answer)
    assert got.supported is supported, (question, answer, got.support, got.sources[:1])


def test_the_first_source_is_the_passage_holding_the_answer(sample):
    _, citer = sample
    got = citer.ground("Who bought the first Heron lantern?", "The lighthouse keeper Amund Fell bought it.")
    assert got.sources[0].document == "04_history.txt" and "Amund Fell" in got.sources[0].snippet
    assert got.sources[0].score == max(s.score for s in got.sources) > 0
    assert len(citer.ground("Who?", "Amund Fell.", sources=5).sources) == 5
    assert citer.ground("Who?", "Amund Fell.", sources=0).sources == []


def test_bad_grounding_options_are_refused_by_name():
    for sources, mode, says in [(-1, "flag", "sources"), (21, "flag", "sources"), (True, "flag", "sources"),
                                (3, "hide", "unsupported")]:
        with pytest.raises(GroundingError, match=says):
            grounding.check_options(sources, mode)


HANDBOOK = {
    "policies.md": "# Policies\n\n## Leave\nEvery employee receives 27 days of paid annual leave.\n\n"
                   "## Expenses\nTravel costs are reimbursed within 12 days.",
    "history.txt": "Company history\n\n1987: Odalys Renn opens a glass studio.\n2011: The Golden Wick award.",
}


def _handbook(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in HANDBOOK.items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture
def built(cag_home, tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("CAG_MEMORY_BYTES", "0")  # every load reads the file on disk
    return cag.build([_handbook(tmp_path / "docs")], name="kb", lm=tiny_lm, log=lambda _m: None)


def test_sources_and_refusals_never_change_an_answers_tokens(built):
    q = "How many days of paid annual leave does an employee get?"
    plain = built.ask(q, max_new_tokens=12, sources=0)
    cited = built.ask(q, max_new_tokens=12, sources=4)
    reference = built.ask(q, max_new_tokens=12, use_cache=False)
    refused = built.ask(q, max_new_tokens=12, unsupported="refuse")
    assert plain.token_ids == cited.token_ids == reference.token_ids == refused.token_ids
    assert plain.sources == [] and len(cited.sources) == 4 and cited.sources[:3] == reference.sources
    assert not refused.supported  # a random-weight model's words are not in the handbook
    assert refused.answer == REFUSAL and refused.generated == cited.answer


def test_refuse_streams_only_the_judged_answer(built):
    pieces = []
    a = built.ask("Who founded the company?", max_new_tokens=12, unsupported="refuse", on_text=pieces.append)
    assert pieces == [a.answer] == [REFUSAL]


def test_the_index_is_stored_with_the_cache_and_loaded_from_it(built, tiny_lm, cag_home):
    cache = cag_home / "kbs" / "kb" / "cache.safetensors"
    stored = kvfile.read_manifest(cache)["passages"]
    assert stored == built.citer.index.to_json() and len(stored["passages"]) == len(built.citer.index)
    loaded = cag.load("kb", lm=tiny_lm, log=lambda _m: None)
    assert loaded.cache_source == "disk" and loaded.citer.index.passages == built.citer.index.passages


FORGED = {
    "an offset moved": lambda m: m["passages"]["passages"][0].__setitem__(1, 1),
    "a passage past its document": lambda m: m["passages"]["passages"][0].__setitem__(2, 10 ** 6),
    "another knowledge's index": lambda m: m["passages"].update(knowledge="0" * 64),
    "another splitter's index": lambda m: m["passages"].update(version=99),
    "a document it does not have": lambda m: m["passages"]["documents"].__setitem__(0, "other.md"),
    "a locator of the wrong type": lambda m: m["passages"]["passages"][0].__setitem__(6, "Leave"),
}


@pytest.mark.parametrize("forgery", sorted(FORGED))
def test_a_tampered_or_stale_index_is_refused_like_a_tampered_cache(built, tiny_lm, cag_home, forgery):
    cache = cag_home / "kbs" / "kb" / "cache.safetensors"
    resave(cache, edit_manifest=FORGED[forgery], recompute=True)  # a forger who recomputes the checksum
    with pytest.raises(CacheFileError, match="passage index refused"):
        cag.load("kb", lm=tiny_lm, log=lambda _m: None)


def test_an_edited_index_without_a_new_checksum_fails_the_checksum(built, tiny_lm, cag_home):
    cache = cag_home / "kbs" / "kb" / "cache.safetensors"
    resave(cache, edit_manifest=FORGED["an offset moved"])
    with pytest.raises(CacheFileError) as err:
        cag.load("kb", lm=tiny_lm, log=lambda _m: None)
    assert "passage index" not in str(err.value)  # caught before: the manifest's digest


def test_a_cache_written_before_indexes_gets_one_made_from_its_documents(built, tiny_lm, cag_home):
    cache = cag_home / "kbs" / "kb" / "cache.safetensors"
    resave(cache, edit_manifest=lambda m: m.pop("passages"), recompute=True)
    loaded = cag.load("kb", lm=tiny_lm, log=lambda _m: None)
    assert loaded.cache_source == "disk" and loaded.citer.index.passages == built.citer.index.passages


def test_the_index_reaches_another_machine_through_redis(tmp_path, tiny_lm, redis_url, monkeypatch):
    monkeypatch.setenv("CAG_REDIS_URL", redis_url)
    monkeypatch.setenv("CAG_HOME", str(tmp_path / "first"))
    first = cag.build([_handbook(tmp_path / "docs")], name="kb", lm=tiny_lm, log=lambda _m: None)
    stores.default().close()  # its listener would go on calling the Redis that this test stops
    monkeypatch.setenv("CAG_HOME", str(tmp_path / "second"))  # nothing on this machine's disk
    second = cag.load("kb", lm=tiny_lm, log=lambda _m: None)
    assert second.cache_source == "redis" and second.citer.index.passages == first.citer.index.passages
    q, a = "Who founded the company?", "Odalys Renn founded it in 1987."
    assert second.citer.ground(q, a) == first.citer.ground(q, a)
    stores.default().close()  # its listener would go on calling the Redis that this test stops


def test_a_sharded_knowledge_base_cites_across_its_shards(cag_home, tiny_lm, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(6):
        (folder / f"part{i}.md").write_text(f"# Part {i}\n" + f"Lantern model L{i} weighs {i + 2} kilograms. " * 12)
    (folder / "zz.md").write_text("# Founding\nThe lantern works was founded by Odalys Renn in 1987.")
    kb = cag.build([folder], name="big", lm=tiny_lm, reserve=tiny_lm.context_window - 600, shard=True,
                   log=lambda _m: None)
    assert len(kb.shards) > 1
    assert {p.document for p in kb.citer.index.passages} == {d.name for d in kb.docs}
    q = "What does lantern model L0 weigh?"
    answer = kb.ask(q, max_new_tokens=4)
    assert answer.shard == kb.route(q).name and len(answer.sources) == 3
    holder = [s.name for s in kb.shards if "zz.md" in {d.name for d in s.docs}][0]
    assert holder != kb.route(q).name  # the founding text sits in another shard than this question's
    assert kb.citer.ground(q, "Odalys Renn founded it in 1987.").sources[0].document == "zz.md"
