"""Hand-built PDFs for the limit tests: one content stream per page, deflated, written byte by byte so a
test can make a file that is small on disk and large (or slow) to read."""

from __future__ import annotations

import zlib
from pathlib import Path

TEXT = b"BT /F1 12 Tf 72 720 Td (The Heron lantern costs 148 crowns.) Tj ET"


def write_pdf(path: Path, contents: list[bytes], pages: int | None = None) -> Path:
    """`pages` pages (default: one per content), page i showing contents[i % len(contents)] (deflated)."""
    pages = pages or len(contents)
    streams = [zlib.compress(c, 9) for c in contents]
    font = 3 + pages + len(streams)
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>",
            f"<< /Type /Pages /Kids [{' '.join(f'{3 + i} 0 R' for i in range(pages))}] /Count {pages} >>".encode()]
    for i in range(pages):
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {3 + pages + i % len(streams)} 0 R "
                    f"/Resources << /Font << /F1 {font} 0 R >> >> >>".encode())
    for data in streams:
        objs.append(f"<< /Length {len(data)} /Filter /FlateDecode >>\nstream\n".encode() + data + b"\nendstream")
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for n, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(bytes(out))
    return path


def bomb(path: Path, megabytes: int = 12) -> Path:
    """A few KB on disk; one content stream of `megabytes` MB of zeros once inflated."""
    return write_pdf(path, [b"0" * (megabytes * 1_000_000)])
