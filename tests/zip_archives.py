"""Zip archives as an attacker would build them, for the intake and security tests."""

from __future__ import annotations

import io
import stat
import zipfile
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
