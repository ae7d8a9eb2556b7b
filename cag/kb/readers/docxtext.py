"""A Word .docx document's text in document order: headings, paragraphs, list items and tables, no images.

mammoth turns the document into simple HTML (Heading N styles to <hN>, Word numbering to nested lists,
tables to tables, footnotes at the end; page headers, footers and comments left out), and htmltext renders
that as the same Markdown an HTML page gives. A .docx is a zip of XML parts: ziplimits refuses a zip bomb
from the central directory before anything is inflated, and every XML part is parsed by defusedxml, which
refuses entity declarations (mammoth parses with xml.dom.minidom, which would expand them).
"""

from __future__ import annotations

import xml.dom.minidom
import zipfile

import ziplimits
from htmltext import markdown
from refusal import Refused

# Word's own Title and Subtitle styles are headings too (mammoth maps only Heading 1-6 by default)
_STYLE_MAP = "p[style-name='Title'] => h1:fresh\np[style-name='Subtitle'] => h2:fresh"


def extract(path: str, max_entries: int, max_bytes: int) -> str:
    import defusedxml
    import defusedxml.minidom
    import mammoth

    with zipfile.ZipFile(path) as archive:
        ziplimits.check(archive, max_entries, max_bytes)
    parse = xml.dom.minidom.parse
    xml.dom.minidom.parse = defusedxml.minidom.parse  # this process reads one file and exits
    try:
        with open(path, "rb") as file:
            result = mammoth.convert_to_html(file, style_map=_STYLE_MAP, include_embedded_style_map=False,
                                             convert_image=lambda image: [])  # no images, not even read
    except defusedxml.DefusedXmlException as err:
        raise Refused(f"its XML declares entities or external references, which are refused ({type(err).__name__})") \
            from None
    finally:
        xml.dom.minidom.parse = parse
    return markdown(result.value)
