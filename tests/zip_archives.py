"""Zip archives as an attacker would build them, for the intake and security tests."""

from __future__ import annotations

import io
import stat
import struct
import zipfile
import zlib
from typing import Any


def make_zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]], **kwargs: Any) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, **kwargs) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    buffer.seek(0)
    return buffer


def symlink_entry(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def encrypted_zip(member: bytes) -> io.BytesIO:
    """One member whose "encrypted" flag is set (in the local header and the central
    directory), without real encryption: the flag alone must be refused."""
    data = bytearray(make_zip([("a.png", member)]).getvalue())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        position = data.find(signature)
        data[position + offset] |= 0x1
    return io.BytesIO(bytes(data))


# -- archives written byte by byte (what zipfile would never write) ---------------------------


def deflate_raw(data: bytes) -> bytes:
    """``data`` as a raw deflate stream, as a zip member holds it."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


def local_header(name: bytes, crc: int, compressed: int, size: int) -> bytes:
    """A deflated member's local file header (no data descriptor, no extra field)."""
    return (
        struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, compressed, size, len(name), 0)
        + name
    )


def central_record(name: bytes, crc: int, compressed: int, size: int, offset: int) -> bytes:
    """A central-directory record of a deflated member whose local header is at ``offset``."""
    fields = (0x02014B50, 20, 20, 0, 8, 0, 0, crc, compressed, size, len(name), 0, 0, 0, 0, 0)
    return struct.pack("<IHHHHHHIIIHHHHHII", *fields, offset) + name


def assemble(body: bytes, records: list[bytes]) -> io.BytesIO:
    """Local headers and data (``body``), then the central directory and its end record."""
    directory = b"".join(records)
    end = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, len(records), len(records), len(directory), len(body), 0
    )
    return io.BytesIO(body + directory + end)


def overlapping_zip(kernel: bytes, copies: int, *, same_name: bool = True) -> io.BytesIO:
    """One deflated member, listed ``copies`` times in the central directory, every record
    pointing at the same local header: each copy passes the per-entry checks, and together
    they inflate ``copies`` times over. ``same_name``: every record keeps the member's name, so
    each one matches the local header it points to."""
    data = deflate_raw(kernel)
    crc = zlib.crc32(kernel)
    body = local_header(b"face.png", crc, len(data), len(kernel)) + data
    names = [b"face.png" if same_name else f"face{i:03d}.png".encode() for i in range(copies)]
    return assemble(body, [central_record(n, crc, len(data), len(kernel), 0) for n in names])


def quoted_overlap_zip(kernel: bytes) -> io.BytesIO:
    """David Fifield's "better zip bomb" in two entries: ``b.png`` is the kernel, and ``a.png``'s
    data starts with a stored deflate block that quotes ``b.png``'s local header, then goes on
    with ``b.png``'s data. Every name matches its header and every size is honest; only the
    entries' byte ranges overlap (``b.png`` lies inside ``a.png``)."""
    data = deflate_raw(kernel)
    inner = local_header(b"b.png", zlib.crc32(kernel), len(data), len(kernel))
    quote = b"\x00" + struct.pack("<HH", len(inner), len(inner) ^ 0xFFFF)  # stored, not final
    outer_data = quote + inner + data
    outer_plain = inner + kernel
    outer = local_header(b"a.png", zlib.crc32(outer_plain), len(outer_data), len(outer_plain))
    body = outer + outer_data
    records = [
        central_record(b"a.png", zlib.crc32(outer_plain), len(outer_data), len(outer_plain), 0),
        central_record(b"b.png", zlib.crc32(kernel), len(data), len(kernel), len(outer + quote)),
    ]
    return assemble(body, records)


def lying_zip(payload: bytes, declared: int, *, honest: int = 0) -> io.BytesIO:
    """``honest`` ordinary members (``0.png``...), then ``small.png``: ``payload`` deflated, whose
    header and directory say it is ``declared`` bytes, with the CRC of those first bytes. A
    reader that stops at the declared size finds nothing wrong; only one that counts what
    really inflates sees the lie."""
    members = [(f"{i}.png".encode(), b"\x89PNG" + bytes([i]) * 60) for i in range(honest)]
    body, records = b"", []
    for name, plain in [*members, (b"small.png", payload)]:
        data = deflate_raw(plain)
        size = declared if name == b"small.png" else len(plain)
        crc = zlib.crc32(plain[:size])
        records.append(central_record(name, crc, len(data), size, len(body)))
        body += local_header(name, crc, len(data), size) + data
    return assemble(body, records)
