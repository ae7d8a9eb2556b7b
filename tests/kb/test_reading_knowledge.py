"""Reading knowledge: stable order, normalization, formats, and clear errors."""

import pytest

from cag.kb import knowledge
from cag.errors import KnowledgeError

def write_pdf(path, text):
    """A one-page PDF with real text, made with pypdf so the test needs no binary fixture."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    page = writer.add_blank_page(300, 144)
    font = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                             NameObject("/BaseFont"): NameObject("/Helvetica")})
    page[NameObject("/Resources")] = DictionaryObject(
        {NameObject("/Font"): DictionaryObject({NameObject("/F1"): writer._add_object(font)})})
    content = DecodedStreamObject()
    content.set_data(f"BT /F1 12 Tf 20 100 Td ({text}) Tj ET".encode())
    page[NameObject("/Contents")] = writer._add_object(content)
    writer.write(str(path))


def test_folder_is_read_recursively_in_stable_order_skipping_hidden_and_unsupported(tmp_path):
    (tmp_path / "b.md").write_text("# B\nsecond")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.txt").write_text("hidden")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    docs = knowledge.load([tmp_path])
    assert [d.name for d in docs] == ["a.txt", "b.md", "sub/c.txt"]


def test_normalization_makes_line_endings_irrelevant(tmp_path):
    (tmp_path / "unix.txt").write_text("line one\nline two  \n\n")
    (tmp_path / "dos.txt").write_bytes(b"line one\r\nline two\r\n")
    unix, dos = knowledge.load([tmp_path / "unix.txt"]), knowledge.load([tmp_path / "dos.txt"])
    assert unix[0].text == dos[0].text == "line one\nline two"


def test_content_hash_changes_with_content_and_name(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("v1")
    h1 = knowledge.content_hash(knowledge.load([f]))
    assert h1 == knowledge.content_hash(knowledge.load([f]))
    f.write_text("v2")
    assert knowledge.content_hash(knowledge.load([f])) != h1
    f.rename(tmp_path / "b.txt")
    assert knowledge.content_hash(knowledge.load([tmp_path / "b.txt"])) != knowledge.content_hash(
        [knowledge.Document("a.txt", "v2")])


def test_html_becomes_text(tmp_path):
    (tmp_path / "p.html").write_text("<html><body><h1>Wren</h1><p>Battery lasts <b>40 hours</b>.</p>"
                                     "<script>var x=1;</script></body></html>")
    text = knowledge.load([tmp_path / "p.html"])[0].text
    assert "Wren" in text and "40 hours" in text and "<p>" not in text


def test_pdf_text_is_extracted(tmp_path):
    write_pdf(tmp_path / "d.pdf", "The Heron weighs 3.2 kg.")
    assert "Heron weighs 3.2 kg" in knowledge.load([tmp_path / "d.pdf"])[0].text


def test_missing_path_is_named(tmp_path):
    with pytest.raises(KnowledgeError, match=f"not found: {tmp_path / 'nope.md'}"):
        knowledge.load([tmp_path / "nope.md"])


def test_unsupported_and_empty_inputs(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\0\1")
    with pytest.raises(KnowledgeError, match="unsupported file type .bin"):
        knowledge.load([tmp_path / "x.bin"])
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(KnowledgeError, match="empty"):
        knowledge.load([tmp_path / "empty.txt"])
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa bad")
    with pytest.raises(KnowledgeError, match="not UTF-8"):
        knowledge.load([tmp_path / "bad.txt"])
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(KnowledgeError, match="no readable documents"):
        knowledge.load([empty_dir])
