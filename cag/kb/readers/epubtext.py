"""An EPUB book's text: its title, then every chapter in reading order (the spine), each chapter's XHTML
through htmltext like a web page but with nothing dropped as site chrome. No images.

An EPUB is a zip: META-INF/container.xml names the package document (OPF), whose manifest lists the files
and whose spine gives their reading order. That is all a reader needs, so it is read here with zipfile and
defusedxml (entity declarations refused) rather than through ebooklib, whose AGPL licence does not suit
this Apache-2.0 project. ziplimits refuses a zip bomb from the central directory before anything is inflated.
"""

from __future__ import annotations

import posixpath
import zipfile
from urllib.parse import unquote

import ziplimits
from htmltext import page_text
from refusal import Refused

_NS = {"c": "urn:oasis:names:tc:opendocument:xmlns:container", "opf": "http://www.idpf.org/2007/opf",
       "dc": "http://purl.org/dc/elements/1.1/"}
_CHAPTER_TYPES = {"application/xhtml+xml", "text/html"}


def _xml(archive: zipfile.ZipFile, name: str):
    import defusedxml
    from defusedxml.ElementTree import fromstring

    try:
        return fromstring(archive.read(name))
    except KeyError:
        raise ValueError(f"it has no {name}, which every EPUB has") from None
    except defusedxml.DefusedXmlException as err:
        raise Refused(f"its {name} declares XML entities or external references, which are refused "
                      f"({type(err).__name__})") from None


def extract(path: str, max_entries: int, max_bytes: int) -> str:
    with zipfile.ZipFile(path) as archive:
        ziplimits.check(archive, max_entries, max_bytes)
        rootfile = _xml(archive, "META-INF/container.xml").find(".//c:rootfile", _NS)
        if rootfile is None or not rootfile.get("full-path"):
            raise ValueError("its META-INF/container.xml names no package document")
        opf_name = rootfile.get("full-path")
        package = _xml(archive, opf_name)
        base = posixpath.dirname(opf_name)
        manifest = {item.get("id"): item for item in package.iterfind("opf:manifest/opf:item", _NS)}
        title = " ".join((package.findtext("opf:metadata/dc:title", "", _NS)).split())
        texts = [f"# {title}"] if title else []
        for itemref in package.iterfind("opf:spine/opf:itemref", _NS):
            item = manifest.get(itemref.get("idref"))
            if item is None or item.get("media-type") not in _CHAPTER_TYPES or not item.get("href"):
                continue
            name = posixpath.normpath(posixpath.join(base, unquote(item.get("href"))))
            try:
                chapter = archive.read(name)
            except KeyError:
                raise ValueError(f"its spine names {name}, which it does not hold") from None
            texts.append(page_text(chapter, with_title=False, site_chrome=False))
    return "\n\n".join(t for t in texts if t)
