"""One storage abstraction for uploads and folder jobs, addressed by URL.

The API and the workers may run on different hosts. A path on the API's disk means nothing to
a worker elsewhere, so every stored object is named by a URL that any process can read:
``file:///abs/path`` (one machine, or a shared volume) or ``s3://bucket/prefix/key`` (MinIO in
compose, AWS S3 in production). :class:`Storage` writes and lists below one root URL (the API's
``EMOTIONS_STORAGE_URL``); :func:`read_location` reads any location a job row holds, which is
what workers need: they never write, and a folder job may point at a different bucket.

Both go through fsspec, so local disks and S3-compatible servers share one code path. The
filesystem objects are cached per protocol and endpoint: building an ``s3fs`` client costs an
event loop and a connection pool, too much for once per image.

``file://`` URLs here are fsspec's: ``file://`` followed by the absolute path as is, not
percent-encoded, so a stored name such as ``a (1).png`` round-trips unchanged.

Core library: no Flask, no Celery.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import posixpath
import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import IO
from typing import Final

import fsspec
from fsspec import AbstractFileSystem
from fsspec.spec import AbstractBufferedFile

from face_emotions.data.data_root import DRIVE_LETTER

COPY_BUFFER: Final[int] = 1024 * 1024
LOCAL_PROTOCOL: Final[str] = "file"
REMOTE_PROTOCOLS: Final[frozenset[str]] = frozenset({"s3"})
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# S3 bucket names: 3-63 characters of lower-case letters, digits, dots and hyphens.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class StorageLimitError(ValueError):
    """A stream or object is larger than the caller allowed; nothing is kept of it."""

    def __init__(self, location: str, limit: int) -> None:
        super().__init__(f"{location}: more than {limit} bytes")
        self.location = location
        self.limit = limit

    def __reduce__(self) -> tuple[type[StorageLimitError], tuple[str, int]]:
        return (type(self), (self.location, self.limit))


@dataclass(frozen=True)
class Location:
    """A parsed location: ``protocol`` is ``file`` or ``s3``; ``path`` is fsspec's path.

    For ``file`` the path is absolute (``/data/x.png``); for ``s3`` it is ``bucket/key``.
    """

    protocol: str
    path: str

    @property
    def is_local(self) -> bool:
        return self.protocol == LOCAL_PROTOCOL

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.path}"


def parse_location(location: str | os.PathLike[str]) -> Location:
    """Split a URL or plain path into protocol and fsspec path; refuse unknown schemes.

    A plain path (no ``scheme://``) is local and made absolute, so a location stored in a job
    row never depends on the reader's working directory.
    """
    text = os.fspath(location)
    if "\x00" in text:
        raise ValueError("a storage location must not contain a NUL byte")
    match = _SCHEME.match(text)
    if match is None:
        if not text:
            raise ValueError("an empty storage location")
        return Location(LOCAL_PROTOCOL, os.path.abspath(os.path.expanduser(text)))
    scheme = match.group(1).lower()
    rest = text[match.end() :]
    if scheme == LOCAL_PROTOCOL:
        if not rest.startswith("/"):
            raise ValueError(f"{text!r}: file URLs must be absolute (file:///path)")
        return Location(LOCAL_PROTOCOL, posixpath.normpath(rest) if rest != "/" else "/")
    if scheme in REMOTE_PROTOCOLS:
        path = rest.strip("/")
        bucket = path.split("/", 1)[0]
        if not _BUCKET.match(bucket):
            raise ValueError(f"{text!r}: {bucket!r} is not a valid bucket name")
        return Location(scheme, path)
    raise ValueError(f"{text!r}: unsupported storage scheme {scheme!r}; use file:// or s3://")


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for locations that only an object-store client can read (``s3://...``)."""
    return not parse_location(location).is_local


def local_path(location: str | os.PathLike[str]) -> str | None:
    """The local filesystem path of a plain path or ``file://`` URL; None for remote ones.

    Workers use it for their fast path: a local file is decoded straight from disk, without
    reading it into memory first.
    """
    parsed = parse_location(location)
    return parsed.path if parsed.is_local else None


def normalise_url(url: str | os.PathLike[str], *, resolve: bool = True) -> str:
    """Canonical URL of a storage root: plain paths become ``file://`` URLs.

    ``resolve`` follows symlinks of a local root, as the old ``resolved_storage_root`` did, so
    the locations written into job rows are the real paths.
    """
    parsed = parse_location(url)
    if parsed.is_local and resolve:
        return f"{LOCAL_PROTOCOL}://{Path(parsed.path).resolve()}"
    return parsed.url


def check_key(key: str) -> str:
    """Validate an object key: a non-empty relative POSIX path without ``.``/``..`` parts.

    Keys are joined to a root URL; validating them here is the last line of defence against a
    name that would write or delete outside the root, whatever sanitising callers did first.
    """
    if not isinstance(key, str) or not key:
        raise ValueError("an object key must be a non-empty string")
    if "\x00" in key or "\\" in key:
        raise ValueError(f"object key {key!r} contains a NUL byte or a backslash")
    if key.startswith("/") or DRIVE_LETTER.match(key):
        raise ValueError(f"object key {key!r} is absolute")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"object key {key!r} has an empty, '.' or '..' component")
    return key


@lru_cache(maxsize=16)
def filesystem(protocol: str, endpoint_url: str | None = None) -> AbstractFileSystem:
    """The fsspec filesystem of a protocol (and S3 endpoint), built once per process.

    S3 credentials come from the standard AWS variables (``AWS_ACCESS_KEY_ID``, ...), as every
    AWS client reads them. The listings cache is off: a long-running API must see images added
    to a data bucket after its first listing.
    """
    if protocol == LOCAL_PROTOCOL:
        return fsspec.filesystem(LOCAL_PROTOCOL)
    if protocol == "s3":
        client_kwargs = {"endpoint_url": endpoint_url} if endpoint_url else {}
        return fsspec.filesystem("s3", client_kwargs=client_kwargs, use_listings_cache=False)
    raise ValueError(f"unsupported storage protocol {protocol!r}")


def _filesystem_for(location: Location, s3_endpoint_url: str | None) -> AbstractFileSystem:
    return filesystem(location.protocol, None if location.is_local else s3_endpoint_url)


def _read(fs: AbstractFileSystem, path: str, label: str, max_bytes: int | None) -> bytes:
    """Whole object, or :class:`StorageLimitError` past ``max_bytes``.

    The bounded read asks for ``max_bytes + 1`` bytes in one ranged request, so a huge object
    is never downloaded and no extra HEAD request is spent on the usual small image.
    """
    if max_bytes is None:
        return bytes(fs.cat_file(path))
    try:
        data = fs.cat_file(path, start=0, end=max_bytes + 1)
    except OSError as exc:
        # S3 answers 416 ("range not satisfiable") for any range of an empty object.
        if exc.errno == errno.EINVAL and fs.size(path) == 0:
            return b""
        raise
    if len(data) > max_bytes:
        raise StorageLimitError(label, max_bytes)
    return bytes(data)


def read_location(
    location: str | os.PathLike[str],
    *,
    s3_endpoint_url: str | None = None,
    max_bytes: int | None = None,
) -> bytes:
    """Bytes of any ``file://``, plain-path or ``s3://`` location.

    Raises ``FileNotFoundError`` for a missing object (callers record a per-image error),
    :class:`StorageLimitError` when ``max_bytes`` is exceeded, other ``OSError``\\s for
    unreadable ones.
    """
    parsed = parse_location(location)
    fs = _filesystem_for(parsed, s3_endpoint_url)
    return _read(fs, parsed.path, os.fspath(location), max_bytes)


@dataclass(frozen=True)
class StorageReader:
    """Reads job locations for a worker: only the S3 endpoint has to be configured."""

    s3_endpoint_url: str | None = None

    def read_bytes(self, location: str, *, max_bytes: int | None = None) -> bytes:
        return read_location(location, s3_endpoint_url=self.s3_endpoint_url, max_bytes=max_bytes)


@dataclass(frozen=True)
class PrefixUsage:
    """What a prefix holds (:meth:`Storage.usage`); ``newest`` is a POSIX time or None."""

    files: int
    bytes: int
    newest: float | None


def _modified(info: dict) -> float | None:
    """When an fsspec entry last changed: ``mtime`` (local), ``LastModified`` (S3)."""
    value = info.get("mtime", info.get("LastModified"))
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value) if isinstance(value, int | float) else None


class Storage:
    """Objects below one root URL, addressed by relative keys (``jobs/<id>/a.png``).

    Writers get URLs back (:meth:`url_for`) that go into job rows, so a reader on another host
    needs no knowledge of this root. Local writes create files exclusively: nothing already
    stored is ever overwritten. S3 writes do not ask for that, because conditional writes are
    not supported by every S3-compatible server; upload keys are unique per job anyway.
    """

    def __init__(self, root: Location, fs: AbstractFileSystem) -> None:
        self.root = root
        self.fs = fs

    @classmethod
    def from_url(
        cls, url: str | os.PathLike[str], *, s3_endpoint_url: str | None = None
    ) -> Storage:
        """``file:///path`` or a plain path: local disk; ``s3://bucket/prefix``: s3fs."""
        root = parse_location(normalise_url(url))
        return cls(root, _filesystem_for(root, s3_endpoint_url))

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    @property
    def url(self) -> str:
        return self.root.url

    @property
    def is_local(self) -> bool:
        return self.root.is_local

    def _path(self, key: str) -> str:
        return posixpath.join(self.root.path, check_key(key))

    def url_for(self, key: str) -> str:
        """Full URL of the object ``key``; what job rows store and workers read."""
        return f"{self.root.protocol}://{self._path(key)}"

    def key_for(self, url_or_key: str) -> str:
        """The key of a URL inside this storage (a key is returned validated, as is)."""
        if _SCHEME.match(url_or_key) is None:
            return check_key(url_or_key)
        parsed = parse_location(url_or_key)
        prefix = self.root.path.rstrip("/") + "/"
        if parsed.protocol != self.root.protocol or not parsed.path.startswith(prefix):
            raise ValueError(f"{url_or_key!r} is not inside {self.url}")
        return check_key(parsed.path[len(prefix) :])

    def write_stream(self, key: str, stream: IO[bytes], *, max_bytes: int | None = None) -> int:
        """Copy ``stream`` into ``key`` in 1 MiB blocks; returns the bytes written.

        Streamed, so a 500 MiB upload never sits in memory. Past ``max_bytes`` the copy stops
        with :class:`StorageLimitError` before the extra block is written, and whatever was
        written of the object is removed (an S3 multipart upload is aborted), as after any
        other failure.
        """
        path = self._path(key)
        if self.is_local:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        handle = self.fs.open(path, "xb" if self.is_local else "wb")
        written = 0
        try:
            while block := stream.read(COPY_BUFFER):
                written += len(block)
                if max_bytes is not None and written > max_bytes:
                    raise StorageLimitError(self.url_for(key), max_bytes)
                handle.write(block)
        except BaseException:
            self._abandon(handle, path)
            raise
        handle.close()
        return written

    def write_bytes(self, key: str, data: bytes) -> int:
        return self.write_stream(key, io.BytesIO(data))

    def _abandon(self, handle: object, path: str) -> None:
        """Drop a half-written object without committing it.

        A local file was created exclusively by this write, so it is ours to remove. An S3
        upload is only visible once committed: discarding it leaves the bucket as it was, and
        nothing is deleted there (an object of that name would not be ours).
        """
        try:
            if isinstance(handle, AbstractBufferedFile):
                handle.discard()  # s3fs: abort the multipart upload, drop the buffer
                handle.closed = True  # closing would upload what was buffered
            else:
                handle.close()  # type: ignore[attr-defined]
            if self.is_local:
                self.fs.rm_file(path)
        except Exception:  # the original error matters more than a failed cleanup
            pass

    def read_bytes(self, url_or_key: str, *, max_bytes: int | None = None) -> bytes:
        """Bytes of an object of this storage, given its key or its URL."""
        key = self.key_for(url_or_key)
        return _read(self.fs, self._path(key), self.url_for(key), max_bytes)

    def exists(self, url_or_key: str) -> bool:
        return bool(self.fs.exists(self._path(self.key_for(url_or_key))))

    def is_dir(self, key: str = "") -> bool:
        """True if ``key`` (or the root, for ``""``) holds objects; S3 has no empty folders."""
        path = self._path(key) if key else self.root.path
        return bool(self.fs.isdir(path))

    def find(self, key: str = "", *, recursive: bool = True) -> list[str]:
        """Keys (relative to the root) of the files below ``key``, sorted."""
        base = self._path(key) if key else self.root.path
        found = self.fs.find(base, maxdepth=None if recursive else 1, withdirs=False)
        prefix = self.root.path.rstrip("/") + "/"
        keys = [name[len(prefix) :] for name in found if name.startswith(prefix)]
        return sorted(keys, key=lambda name: name.split("/"))

    def list_names(self, key: str) -> list[str]:
        """Names of the files and folders directly below ``key``, sorted; [] when none."""
        base = self._path(key)
        try:
            entries = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []
        names = {posixpath.basename(str(entry).rstrip("/")) for entry in entries}
        return sorted(name for name in names if name)

    def usage(self, key: str) -> PrefixUsage:
        """What ``key`` holds: its files, their bytes, and when anything below it last changed.

        On a local disk the folders' own times count too (a file being created or removed
        moves its folder's), so an empty folder left behind still has an age; S3 has no
        folders, only objects.
        """
        try:
            found = self.fs.find(self._path(key), withdirs=True, detail=True)
        except FileNotFoundError:
            return PrefixUsage(0, 0, None)
        files = [info for info in found.values() if info.get("type") != "directory"]
        times = [t for t in map(_modified, found.values()) if t is not None]
        size = sum(int(info.get("size") or 0) for info in files)
        return PrefixUsage(files=len(files), bytes=size, newest=max(times, default=None))

    def delete(self, url_or_key: str) -> None:
        """Remove one object; a missing one is not an error."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(self.key_for(url_or_key)))

    def delete_prefix(self, key: str) -> None:
        """Remove ``key`` and everything below it (``jobs/<id>``); missing is not an error.

        Keys are whole path components, so deleting ``jobs/ab`` never touches ``jobs/abc``.
        """
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            if self.fs.isdir(path):
                self.fs.rm(path, recursive=True)
            elif self.fs.exists(path):
                self.fs.rm_file(path)
