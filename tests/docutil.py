"""Real .docx and .epub files made by the tests: Word documents with python-docx (Word's own template, so
real Heading, Title and List styles and numbering), EPUBs zipped from their XML parts as the format says,
and hostile variants (zip bombs, entity bombs)."""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path

ENTITY_BOMB = ('<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
               + "".join(f'<!ENTITY lol{i} "{("&lol%s;" % (i - 1 if i > 1 else "")) * 10}">' for i in range(1, 10))
               + "]>\n")


def png() -> bytes:
    """A 1x1 PNG, for a document that holds a picture."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0\xff\0\0")) + chunk(b"IEND", b""))


def write_docx(path: Path) -> Path:
    """A manual with a title, headings, paragraphs, bullet and numbered lists, a table and a picture."""
    import io

    import docx

    document = docx.Document()
    document.add_heading("Heron Lantern Manual", 0)
    document.add_paragraph("The Heron lantern weighs 3.2 kg.")
    document.add_picture(io.BytesIO(png()))
    document.add_heading("Charging", 1)
    document.add_paragraph("Charge it with the supplied cable.")
    document.add_paragraph("Use the supplied cable only.", style="List Bullet")
    document.add_paragraph("Keep the port dry.", style="List Bullet")
    document.add_paragraph("Open the cover.", style="List Number")
    document.add_paragraph("Plug in the cable.", style="List Number")
    document.add_heading("Specifications", 2)
    table = document.add_table(rows=3, cols=3)
    for r, row in enumerate([("Mode", "Lumens", "Runtime"), ("Low", "100", "40 h"), ("High", "800", "6 h")]):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    document.add_paragraph("It is rated IPX4.")
    document.save(str(path))
    return path


def replace_part(path: Path, name: str, data: bytes) -> Path:
    """Rewrite the zip at `path` with its part `name` replaced by `data`."""
    with zipfile.ZipFile(path) as source:
        parts = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for info, content in parts:
            out.writestr(info, data if info.filename == name else content)
    return path


CONTAINER = ('<?xml version="1.0"?><container version="1.0" xmlns="urn:oasis:names:tc:opendocument:xmlns:container">'
             '<rootfiles><rootfile full-path="OEBPS/content.opf" media-type="application/oebps-package+xml"/>'
             "</rootfiles></container>")


def chapter(body: str, title: str | None = "The Heron Book") -> str:
    """An XHTML chapter; title None writes an empty <title/> (XML's self-closed form, which HTML has not)."""
    head = f"<title>{title}</title>" if title is not None else "<title/>"
    return ('<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE html>\n<html xmlns="http://www.w3.org/1999/xhtml" '
            f'xmlns:epub="http://www.idpf.org/2007/ops"><head>{head}'
            f'<script>var reader = "tracking";</script></head><body>{body}</body></html>')


CHAPTERS = {  # file name -> XHTML; the spine reads intro first although its name sorts last
    "text/intro.xhtml": chapter('<section><h1>Introduction</h1><p>The Heron lantern was first made in 1987.</p>'
                                '<img src="../images/cover.png" alt="cover picture"/></section>'),
    "text/care.xhtml": chapter('<h1>Caring for it</h1><ol><li>Wipe the glass.</li><li>Dry the seal.</li></ol>'
                               '<table><tr><th>Part</th><th>Interval</th></tr><tr><td>Seal</td><td>6 months</td></tr>'
                               '</table><p>Never submerge it.<a epub:type="noteref" href="#n1">1</a></p>'
                               '<aside epub:type="footnote" id="n1"><p>It is rated IPX4.</p></aside>', title=None),
    "text/a-nav.xhtml": chapter('<nav epub:type="toc"><ol><li><a href="intro.xhtml">Introduction</a></li></ol></nav>'),
}


def opf(title: str = "The Heron Book") -> str:
    return ('<?xml version="1.0" encoding="utf-8"?>\n<package xmlns="http://www.idpf.org/2007/opf" version="3.0" '
            'unique-identifier="id"><metadata xmlns:dc="http://purl.org/dc/elements/1.1/">'
            f'<dc:identifier id="id">heron-1</dc:identifier><dc:title>{title}</dc:title><dc:language>en</dc:language>'
            '</metadata><manifest>'
            '<item id="nav" href="text/a-nav.xhtml" media-type="application/xhtml+xml" properties="nav"/>'
            '<item id="care" href="text/care.xhtml" media-type="application/xhtml+xml"/>'
            '<item id="intro" href="text/intro.xhtml" media-type="application/xhtml+xml"/>'
            '<item id="cover" href="images/cover.png" media-type="image/png"/>'
            '</manifest><spine><itemref idref="intro"/><itemref idref="care"/></spine></package>')


def write_epub(path: Path, package: str | None = None, chapters: dict[str, str] = CHAPTERS) -> Path:
    """An EPUB 3 book: mimetype first and stored, container, package document, chapters, a picture."""
    with zipfile.ZipFile(path, "w") as out:
        out.writestr("mimetype", "application/epub+zip", compress_type=zipfile.ZIP_STORED)
        out.writestr("META-INF/container.xml", CONTAINER, compress_type=zipfile.ZIP_DEFLATED)
        out.writestr("OEBPS/content.opf", package or opf(), compress_type=zipfile.ZIP_DEFLATED)
        for name, text in chapters.items():
            out.writestr(f"OEBPS/{name}", text, compress_type=zipfile.ZIP_DEFLATED)
        out.writestr("OEBPS/images/cover.png", png())
    return path


def add_bomb(path: Path, megabytes: int) -> Path:
    """Add to the zip at `path` an entry of `megabytes` MB of zeros: ~1 MB on disk, and its true size declared."""
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED, compresslevel=1) as out:
        with out.open("word/media/padding.bin", "w", force_zip64=True) as entry:
            zeros = bytes(1 << 20)
            for _ in range(megabytes):
                entry.write(zeros)
    return path
