"""HTML to Markdown-ish text: the page's <title> and its main content, without navigation, site headers and
footers, sidebars, cookie banners or scripts.

The main content is found from the page's own structure, not guessed from text statistics: a <main> (or
role="main") if the page has one, else its only top-level <article>, else the whole <body> less the page
chrome (<header>, <footer>, <aside> outside an article, ARIA banner/contentinfo/complementary/dialog roles,
and blocks whose id or class names a cookie/consent banner, sidebar, navbar or breadcrumb). Statistical
extractors (trafilatura, readability) drop headings, lists and tables from plain document pages, and a
lost heading or table is a wrong answer later; this keeps everything that is not chrome. Should nothing be
left, the whole page is converted, so no page loses all its text. html2text renders the rest as Markdown
(headings, lists, tables as rows), which a model reads well.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

_DECLARED = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9._:-]+)"""
                       rb"""|<\?xml[^>]+encoding\s*=\s*["']([A-Za-z0-9._:-]+)""", re.IGNORECASE)
_XML_DECLARATION = re.compile(r"^\s*<\?xml[^>]*\?>")
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))

# never text for a reader, wherever they are
_NEVER = (".//script | .//style | .//noscript | .//template | .//svg | .//canvas | .//iframe | .//object"
          " | .//embed | .//button | .//select | .//nav | .//*[@role='navigation' or @role='search']")
# the page's own chrome, dropped when the content is the whole <body> (inside an article or section a
# <header> holds its title and an <aside> a note, so those stay)
_CHROME = (".//header[not(ancestor::article or ancestor::section)]"
           " | .//footer[not(ancestor::article or ancestor::section)]"
           " | .//aside[not(ancestor::article or ancestor::section)]"
           " | .//*[@role='banner' or @role='contentinfo' or @role='complementary' or @role='dialog'"
           " or @role='alertdialog']")
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")  # html2text leaves runs of them after lists
_BANNER = re.compile(r"cookie|consent|gdpr|sidebar|side-bar|navbar|breadcrumb|skip-link", re.IGNORECASE)


def decode(raw: bytes) -> str:
    """The page as text: by its byte-order mark, else its declared charset, else UTF-8 (bad bytes replaced)."""
    for bom, codec in _BOMS:
        if raw.startswith(bom):
            return raw.decode(codec, errors="replace")
    codec = "utf-8"
    declared = _DECLARED.search(raw[:4096])
    if declared:
        try:
            codec = codecs.lookup((declared.group(1) or declared.group(2)).decode("ascii")).name
        except LookupError:
            pass
        if codec in ("iso8859-1", "ascii"):
            codec = "cp1252"  # what browsers read for these labels
    return raw.decode(codec, errors="replace")


def markdown(html: str) -> str:
    """`html` as Markdown: no hard wrapping (it would waste tokens), no images, Unicode kept as is."""
    import html2text

    converter = html2text.HTML2Text()
    converter.body_width = 0
    converter.ignore_images = True
    converter.unicode_snob = True
    return _BLANK_LINES.sub("\n\n", converter.handle(html))


def _drop(elements) -> None:
    for element in elements:
        if element.getparent() is not None:
            element.drop_tree()  # keeps the text that follows the element


def _banners(root, total: int) -> list:
    """Blocks named like a banner or sidebar, unless one holds half the text or more (then it is the content:
    a recipe page may well wrap its article in class="cookie-recipe")."""
    named = [e for e in root.iter()
             if isinstance(e.tag, str) and _BANNER.search(f"{e.get('id', '')} {e.get('class', '')}")]
    return [e for e in named if len(e.text_content()) * 2 < total]


def main_content(tree, site_chrome: bool = True):
    """The element holding the page's content, with what is never content removed from it (in place)."""
    body = tree.find("body")
    root = body if body is not None else tree
    whole = True
    for candidate in tree.xpath("//main | //*[@role='main']"):
        if candidate.text_content().strip():
            root, whole = candidate, False
            break
    else:
        articles = [a for a in tree.xpath("//article[not(ancestor::article)]") if a.text_content().strip()]
        if len(articles) == 1:
            root, whole = articles[0], False
    _drop(root.xpath(_NEVER))
    if whole and site_chrome:
        _drop(root.xpath(_CHROME))
    _drop(_banners(root, len(root.text_content())))
    return root


def page_text(raw: bytes, with_title: bool = True, site_chrome: bool = True) -> str:
    """Markdown of the page's main content, after its <title> as a heading (unless the content starts with it).

    `site_chrome=False` keeps <header>, <footer> and <aside> (an e-book chapter has no site around it, and
    its footnotes are asides)."""
    import lxml.etree
    import lxml.html

    source = _XML_DECLARATION.sub("", decode(raw), count=1)
    try:
        tree = lxml.html.document_fromstring(source)
    except lxml.etree.ParserError:  # no element at all: nothing to read
        return ""
    title = " ".join((tree.findtext("head/title") or "").split()) if with_title else ""
    content = markdown(lxml.html.tostring(main_content(tree, site_chrome), encoding="unicode")).strip()
    if not content:  # nothing but chrome: the whole page, so no page loses all its text
        content = markdown(source).strip()
    first = content.split("\n", 1)[0].lstrip("#").strip()
    if title and first.casefold() != title.casefold():
        content = f"# {title}\n\n{content}"
    return content


def extract(path: str, max_bytes: int) -> str:
    size = Path(path).stat().st_size
    if size > max_bytes:
        from refusal import Refused

        raise Refused(f"it is {size} bytes; at most {max_bytes} are read per HTML file")
    return page_text(Path(path).read_bytes())
