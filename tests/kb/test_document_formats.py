"""Reading .docx, .epub and real-world HTML: document order, headings, lists and tables kept; web-page chrome
dropped and the <title> kept; hostile files (zip bombs, entity bombs, huge or slow markup) refused by the
limit meant for them, with a KnowledgeError naming the file and the limit."""

from __future__ import annotations

import httpx
import pytest

import cag
from cag.kb import knowledge
from cag.errors import KnowledgeError
from cag.server import ServerConfig, create_app
from docutil import ENTITY_BOMB, add_bomb, chapter, opf, replace_part, write_docx, write_epub
from pdfutil import TEXT, write_pdf
from serverutil import serving


def _in_order(text: str, *pieces: str) -> None:
    """Each piece is in `text`, each after the one before."""
    at = -1
    for piece in pieces:
        found = text.find(piece, at + 1)
        assert found > at, f"{piece!r} missing or out of order in:\n{text}"
        at = found


def _rows(text: str) -> list[list[str]]:
    """The table rows of Markdown text, as lists of cells."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if "|" in line and not line.startswith("#") and set(line) - set("|-: ")]


@pytest.fixture(scope="module")
def bomb_docx(tmp_path_factory):
    """A real .docx with an extra part of zeros that declares more than ZIP_MAX_BYTES: ~1 MB on disk."""
    path = write_docx(tmp_path_factory.mktemp("bomb") / "bomb.docx")
    return add_bomb(path, knowledge.ZIP_MAX_BYTES // (1 << 20) + 4)


# -- .docx ------------------------------------------------------------------------------------------------

def test_docx_keeps_document_order_headings_lists_and_tables(tmp_path):
    text = knowledge.read_file(write_docx(tmp_path / "manual.docx"))
    assert text.startswith("# Heron Lantern Manual\n")
    _in_order(text, "# Heron Lantern Manual", "The Heron lantern weighs 3.2 kg.", "# Charging",
              "Charge it with the supplied cable.", "* Use the supplied cable only.", "* Keep the port dry.",
              "1. Open the cover.", "2. Plug in the cable.", "## Specifications", "Mode", "High", "It is rated IPX4.")
    assert _rows(text) == [["Mode", "Lumens", "Runtime"], ["Low", "100", "40 h"], ["High", "800", "6 h"]]
    assert "![" not in text and "data:" not in text and "<" not in text  # no picture, no markup


def test_docx_zip_bomb_is_refused_from_its_directory(bomb_docx):
    assert bomb_docx.stat().st_size < 2_000_000
    with pytest.raises(KnowledgeError, match=rf"refused to read .*bomb\.docx: it unpacks to \d+ bytes; at most "
                                             rf"{knowledge.ZIP_MAX_BYTES} are read"):
        knowledge.load([bomb_docx])


def test_docx_with_too_many_parts_is_refused(tmp_path, monkeypatch):
    path = write_docx(tmp_path / "parts.docx")
    monkeypatch.setattr(knowledge, "ZIP_MAX_ENTRIES", 5)
    with pytest.raises(KnowledgeError, match=r"parts\.docx: it holds \d+ files; at most 5 are read"):
        knowledge.read_file(path)


def test_docx_entity_bomb_is_refused(tmp_path):
    body = ('<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body><w:p><w:r>'
            "<w:t>&lol9;</w:t></w:r></w:p></w:body></w:document>")
    path = replace_part(write_docx(tmp_path / "lol.docx"), "word/document.xml", (ENTITY_BOMB + body).encode())
    with pytest.raises(KnowledgeError, match=r"lol\.docx: its XML declares entities or external references, "
                                             r"which are refused \(EntitiesForbidden\)"):
        knowledge.read_file(path)


def test_a_broken_docx_names_the_file(tmp_path):
    (tmp_path / "broken.docx").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(KnowledgeError, match=r"cannot parse .*broken\.docx: BadZipFile"):
        knowledge.read_file(tmp_path / "broken.docx")


# -- .epub ------------------------------------------------------------------------------------------------

def test_epub_reads_its_title_then_the_chapters_in_spine_order(tmp_path):
    text = knowledge.read_file(write_epub(tmp_path / "book.epub"))
    assert text.startswith("# The Heron Book\n")
    _in_order(text, "# The Heron Book", "# Introduction", "The Heron lantern was first made in 1987.",
              "# Caring for it", "1. Wipe the glass.", "2. Dry the seal.", "Seal", "Never submerge it.",
              "It is rated IPX4.")  # a footnote is an <aside>: in a book it is content
    assert _rows(text) == [["Part", "Interval"], ["Seal", "6 months"]]
    assert text.count("The Heron Book") == 1  # each chapter's <title> repeats the book's
    assert "tracking" not in text and "cover picture" not in text  # no script, no picture
    assert text.count("Introduction") == 1  # the navigation document is not in the spine


def test_epub_zip_bomb_and_entity_bombs_are_refused(tmp_path, monkeypatch):
    with pytest.raises(KnowledgeError, match=r"lol\.epub: its OEBPS/content\.opf declares XML entities"):
        knowledge.read_file(write_epub(tmp_path / "lol.epub", package=ENTITY_BOMB + opf("&lol9;").split("?>", 1)[1]))
    # a chapter's DTD is not read: its entities stay unexpanded text, and the rest of the book is read
    bombed = {"text/intro.xhtml": ENTITY_BOMB + chapter("<p>Before &lol9; after.</p>").split("?>", 1)[1],
              "text/care.xhtml": chapter("<p>The second chapter.</p>")}
    text = knowledge.read_file(write_epub(tmp_path / "chapter.epub", chapters=bombed))
    assert "The second chapter." in text and "lollol" not in text and len(text) < 1000
    monkeypatch.setattr(knowledge, "ZIP_MAX_BYTES", 2000)
    with pytest.raises(KnowledgeError, match=r"book\.epub: it unpacks to \d+ bytes; at most 2000 are read"):
        knowledge.read_file(write_epub(tmp_path / "book.epub"))


# -- HTML -------------------------------------------------------------------------------------------------

ARTICLE = """
<h1>Heron Lantern field guide</h1>
<p>The Heron lantern weighs 3.2 kg and runs for 40 hours on one charge.</p>
<h2>Charging</h2>
<p>A full charge takes four hours from a 20 W adapter.</p>
<ul><li>Use the supplied cable only.</li><li>Keep the port dry while charging.</li></ul>
<h2>Specifications</h2>
<table><tr><th>Mode</th><th>Lumens</th></tr><tr><td>Low</td><td>100</td></tr><tr><td>High</td><td>800</td></tr></table>
<p>The lantern is rated IPX4.</p>
"""

CHROME = {  # what a real page wraps around its article, and a phrase from each that must not survive
    "cookie": '<div id="cookie-banner" class="cookie-consent">We use cookies to improve your experience. '
              "<button>Accept all</button></div>",
    "header": '<header class="site-header"><a href="/">Wren Outdoor home</a>'
              '<nav><ul><li><a href="/shop">Shop tents</a></li><li><a href="/blog">Read the blog</a></li></ul></nav>'
              "</header>",
    "sidebar": '<div class="sidebar"><h3>Popular posts</h3><ul><li><a href="/a">Ten knots to know</a></li></ul></div>',
    "aside": "<aside><p>Winter sale: 20% off sleeping bags</p></aside>",
    "footer": '<footer class="site-footer"><p>Copyright 2024 Wren Outdoor Ltd.</p></footer>',
    "script": "<script>window.dataLayer = []; gtag('config');</script><noscript>Enable JavaScript</noscript>",
}
GONE = ["cookies", "Accept all", "Wren Outdoor home", "Shop tents", "Read the blog", "Popular posts", "Ten knots",
        "Winter sale", "Copyright 2024", "dataLayer", "Enable JavaScript"]


def _page(content: str) -> str:
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            "<title>Heron Lantern – Field Guide | Wren Outdoor</title><style>body { color: red }</style></head><body>"
            + CHROME["cookie"] + CHROME["header"] + '<div class="container">' + CHROME["sidebar"] + CHROME["aside"]
            + content + "</div>" + CHROME["footer"] + CHROME["script"] + "</body></html>")


@pytest.mark.parametrize("wrapper", ["<main>{}</main>", "<article>{}</article>", '<div role="main">{}</div>',
                                     '<div class="content">{}</div>'])
def test_a_web_page_gives_its_title_and_article_only(tmp_path, wrapper):
    (tmp_path / "page.html").write_text(_page(wrapper.format(ARTICLE)), encoding="utf-8")
    text = knowledge.read_file(tmp_path / "page.html")
    assert text.startswith("# Heron Lantern – Field Guide | Wren Outdoor\n\n# Heron Lantern field guide\n")
    _in_order(text, "# Heron Lantern field guide", "runs for 40 hours", "## Charging", "four hours",
              "* Use the supplied cable only.", "* Keep the port dry while charging.", "## Specifications",
              "The lantern is rated IPX4.")
    assert _rows(text) == [["Mode", "Lumens"], ["Low", "100"], ["High", "800"]]
    assert [phrase for phrase in GONE if phrase in text] == []


def test_a_plain_document_page_loses_no_heading_list_or_table(tmp_path):
    """An exported document (pandoc-style: a title header, then sections, no <main>): everything is content."""
    sections = "".join(f"<h2>Step {i}</h2><p>Clean part {i} with a dry cloth.</p><ul><li>Check seal {i}</li></ul>"
                       f"<table><tr><th>Part</th><th>Interval</th></tr><tr><td>Seal {i}</td><td>{i} months</td></tr>"
                       "</table>" for i in range(1, 4))
    title = '<header id="title-block-header"><h1 class="title">Lantern care</h1></header>'
    page = f"<html><head><title>Lantern care</title></head><body>{title}{sections}</body></html>"
    (tmp_path / "doc.html").write_text(page)
    text = knowledge.read_file(tmp_path / "doc.html")
    _in_order(text, "# Lantern care", *[piece for i in range(1, 4) for piece in
                                        (f"## Step {i}", f"Clean part {i}", f"* Check seal {i}", f"Seal {i}")])
    assert len([row for row in _rows(text) if row[0].startswith("Seal")]) == 3


def test_a_page_of_nothing_but_chrome_is_read_whole(tmp_path):
    (tmp_path / "hours.html").write_text("<html><body><header><h1>Opening hours</h1><p>Daily 9 to 5.</p></header>"
                                         "<footer>Closed on holidays.</footer></body></html>")
    text = knowledge.read_file(tmp_path / "hours.html")
    _in_order(text, "# Opening hours", "Daily 9 to 5.", "Closed on holidays.")


def test_a_page_about_cookies_keeps_its_content(tmp_path):
    recipe = ('<div class="cookie-recipe"><h1>Oat cookies</h1><p>Mix 200 g of oats with 100 g of butter, then bake '
              "the cookies for twelve minutes at 180 degrees until golden.</p></div>")
    (tmp_path / "recipe.html").write_text(f"<html><body>{recipe}<div id='cookie-notice'>We use cookies.</div></body>"
                                          "</html>")
    text = knowledge.read_file(tmp_path / "recipe.html")
    assert "# Oat cookies" in text and "twelve minutes" in text and "We use cookies" not in text


def test_html_charset_is_honoured(tmp_path):
    (tmp_path / "latin.html").write_bytes('<html><head><meta charset="iso-8859-1"><title>Café</title></head><body>'
                                          "<p>Crème brûlée costs 7 crowns.</p></body></html>".encode("latin-1"))
    (tmp_path / "utf8.htm").write_bytes("<p>Crème brûlée costs 7 crowns.</p>".encode())
    assert knowledge.read_file(tmp_path / "latin.html") == "# Café\n\nCrème brûlée costs 7 crowns."
    assert knowledge.read_file(tmp_path / "utf8.htm") == "Crème brûlée costs 7 crowns."


def test_huge_or_slow_html_is_refused_by_its_limits(tmp_path, monkeypatch):
    page = tmp_path / "big.html"
    page.write_text("<html><body>" + "<p>The lantern is <b>bright</b> and the battery lasts.</p>" * 60_000
                    + "</body></html>")  # ~3.5 MB: under the size limit, seconds of converting
    monkeypatch.setattr(knowledge, "HTML_MAX_BYTES", 1_000_000)
    with pytest.raises(KnowledgeError, match=rf"big\.html: it is {page.stat().st_size} bytes; at most 1000000 are "
                                             r"read per HTML file"):
        knowledge.read_file(page)
    monkeypatch.setattr(knowledge, "HTML_MAX_BYTES", 10_000_000)
    monkeypatch.setattr(knowledge, "DOC_MAX_SECONDS", 1)
    with pytest.raises(KnowledgeError, match=r"big\.html: parsing it took more than 1 s \(the limit per HTML file\)"):
        knowledge.read_file(page)


# -- folders and the server -------------------------------------------------------------------------------

def test_a_folder_of_every_type_is_read_in_sorted_order(tmp_path):
    (tmp_path / "a.txt").write_text("Plain text about lanterns.")
    (tmp_path / "b.md").write_text("# Markdown\nThe lantern is blue.")
    (tmp_path / "c.html").write_text("<html><head><title>Web page</title></head><body><main><p>Sold in 12 shops."
                                     "</p></main></body></html>")
    write_pdf(tmp_path / "d.pdf", [TEXT])
    write_docx(tmp_path / "e.docx")
    write_epub(tmp_path / "f.epub")
    (tmp_path / "sub").mkdir()
    write_docx(tmp_path / "sub" / "g.docx")
    (tmp_path / "h.png").write_bytes(b"\x89PNG")
    skipped: list[str] = []
    docs = knowledge.load([tmp_path], log=skipped.append)
    assert [d.name for d in docs] == ["a.txt", "b.md", "c.html", "d.pdf", "e.docx", "f.epub", "sub/g.docx"]
    starts = ["Plain text", "# Markdown", "# Web page", "The Heron lantern costs 148 crowns.",
              "# Heron Lantern Manual", "# The Heron Book", "# Heron Lantern Manual"]
    assert [d.text[:len(s)] for d, s in zip(docs, starts)] == starts
    assert len(skipped) == 1 and "h.png" in skipped[0] and ".docx" in skipped[0] and ".epub" in skipped[0]


def test_docx_and_epub_are_uploadable(cag_home, sharp_lm, tmp_path, bomb_docx):
    assert {".docx", ".epub"} <= knowledge.SUPPORTED
    manual = write_docx(tmp_path / "manual.docx")
    with serving(create_app(ServerConfig(semantic_threshold=None), sharp_lm)) as url:
        r = httpx.post(url + "/v1/kbs/upload", data={"name": "manual"}, timeout=120,
                       files=[("files", ("manual.docx", manual.read_bytes(), "application/octet-stream"))])
        assert r.status_code == 201, r.text
        assert r.json()["documents"] == ["manual.docx"]
        bombed = httpx.post(url + "/v1/kbs/upload", data={"name": "bombed"}, timeout=120,
                            files=[("files", ("bomb.docx", bomb_docx.read_bytes(), "application/octet-stream"))])
        assert bombed.status_code == 400, bombed.text
        assert "bomb.docx: it unpacks to" in bombed.json()["error"]["message"]
    uploaded = cag.load("public__manual", lm=sharp_lm, log=lambda _m: None)  # the knowledge base it built
    assert uploaded.docs == knowledge.load([manual])
    assert uploaded.docs[0].text.startswith("# Heron Lantern Manual\n")


def test_a_parsed_document_is_not_parsed_again_until_its_bytes_change(tmp_path, monkeypatch):
    """Every load re-reads a knowledge base's sources; documents that need a child process to parse are
    parsed once per distinct content (extractions kept under CAG_HOME)."""
    from cag.kb import knowledge
    from cag.kb.readers import sandbox

    monkeypatch.setenv("CAG_HOME", str(tmp_path / "home"))
    page = tmp_path / "page.html"
    page.write_text("<html><head><title>Lanterns</title></head><body><main><p>The Heron costs 148 crowns.</p>"
                    "</main></body></html>")
    calls = []
    real = sandbox.read
    monkeypatch.setattr(sandbox, "read", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    first = knowledge.read_file(page)
    assert "148 crowns" in first and knowledge.read_file(page) == first and len(calls) == 1
    page.write_text(page.read_text().replace("148", "150"))
    assert "150 crowns" in knowledge.read_file(page) and len(calls) == 2
