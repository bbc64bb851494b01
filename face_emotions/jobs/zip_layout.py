"""Where each entry of a zip archive lies in the file: no two entries may share bytes.

A "better zip bomb" (David Fifield, 2019) lists many central-directory entries whose local
headers and data overlap, so that one small compressed kernel is inflated again for every
entry: each entry is honest about its size and ratio, and a 32 KiB archive still writes
hundreds of MiB. Zip writers lay entries out one after the other, before the central directory,
so an archive whose entries overlap (or run into the directory) is refused outright, before
anything is extracted.
"""

from __future__ import annotations

import struct
import zipfile
from typing import IO
from typing import Final

from face_emotions.jobs.intake import IntakeError

#: A local file header: signature, 22 bytes this check does not need, then the lengths of the
#: name and of the extra field that come before the entry's data.
_LOCAL_HEADER: Final = struct.Struct("<4s22xHH")
_LOCAL_SIGNATURE: Final = b"PK\x03\x04"


def entry_end(stream: IO[bytes], info: zipfile.ZipInfo) -> int:
    """Where ``info``'s compressed data ends (a data descriptor after it is not counted).

    The central directory gives where the entry starts and how much compressed data it has;
    the entry's local header gives the lengths of the name and extra field before that data.
    """
    stream.seek(info.header_offset)
    header = stream.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size:
        raise IntakeError("invalid_zip", f"zip entry {info.filename!r} lies past the archive's end")
    signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    if signature != _LOCAL_SIGNATURE:
        raise IntakeError("invalid_zip", f"zip entry {info.filename!r} has no local file header")
    return info.header_offset + _LOCAL_HEADER.size + name_length + extra_length + info.compress_size


def refuse_overlapping_entries(archive: zipfile.ZipFile, stream: IO[bytes]) -> None:
    """Raise ``unsafe_zip`` if two entries share bytes, or an entry runs into the central
    directory; ``stream`` is the archive's file. One 30-byte read per entry, in file order."""
    widest: zipfile.ZipInfo | None = None  # of the entries so far, the one reaching furthest
    widest_end = 0
    for info in sorted(archive.infolist(), key=lambda info: info.header_offset):
        if widest is not None and info.header_offset < widest_end:
            raise IntakeError(
                "unsafe_zip",
                f"zip entries {widest.filename!r} and {info.filename!r} overlap in the "
                "archive: the same bytes would be extracted more than once (zip bomb?)",
            )
        end = entry_end(stream, info)
        if widest is None or end > widest_end:
            widest, widest_end = info, end
    if widest is not None and widest_end > archive.start_dir:
        raise IntakeError(
            "unsafe_zip",
            f"zip entry {widest.filename!r} overlaps the archive's central directory (zip bomb?)",
        )
