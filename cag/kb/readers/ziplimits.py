"""Limits on a zip container (.docx, .epub) checked from its central directory, before anything is inflated.

A zip's entries declare their uncompressed sizes, and zipfile never inflates an entry past what it declares
(more data fails its CRC check), so the declared sizes bound what reading the file can unpack: a zip bomb
(a few KB that claim gigabytes, or many entries sharing one compressed stream) is refused here unread.
"""

from __future__ import annotations

import zipfile

from refusal import Refused


def check(archive: zipfile.ZipFile, max_entries: int, max_bytes: int) -> None:
    """Refuse an archive with more than `max_entries` entries or more than `max_bytes` bytes uncompressed."""
    entries = archive.infolist()
    if len(entries) > max_entries:
        raise Refused(f"it holds {len(entries)} files; at most {max_entries} are read per .docx/.epub file")
    total = sum(entry.file_size for entry in entries)
    if total > max_bytes:
        raise Refused(f"it unpacks to {total} bytes; at most {max_bytes} are read per .docx/.epub file "
                      "(a zip bomb looks like this)")
