"""Every hostile input the API must refuse, one table: what is sent, the status and error code
expected, and, for every row, that nothing was written outside the storage root (nor, for a
refusal, inside it).

Flask's test client against a real SQLite file and a fake queue; the rate-limit row counts in
the real Redis (``redis_url``), as production does. Decompression bombs are accepted at submit
(202) and fail per image in the worker (tests/unit/test_images.py); here the row checks only
that the file stays inside the storage root.
"""

from __future__ import annotations

import io
import os
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image as PILImage
from sqlalchemy import select
from werkzeug.datastructures import FileStorage
from werkzeug.test import TestResponse

from api import create_app
from api.extensions import services
from face_emotions.data.storage import local_path
from face_emotions.jobs import tokens as db_tokens
from face_emotions.jobs.schema import Image
from face_emotions.jobs.schema import Job
from face_emotions.settings import Settings
from tests.fakes import ChunkOnlyBroker as FakeQueue
from tests.zip_archives import encrypted_zip
from tests.zip_archives import make_zip
from tests.zip_archives import symlink_entry

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
MAX_IMAGES = 5
BOOTSTRAP = "security-test-bootstrap-token"


def png(size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", size, (120, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming width x height RGB pixels (30 GB decoded) in ~100 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * (3 * 64 + 1))  # one short row: the rest never arrives
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


# -- the context each row runs in -------------------------------------------------------------


@dataclass
class Ctx:
    """One app on a sandbox directory: ``root`` holds var/ (storage, database), data/ and
    outside/ (files no request may reach)."""

    root: Path
    settings: Settings
    app: Flask
    client: FlaskClient
    token: str
    other_token: str
    queue: FakeQueue
    marked: list[Path] = field(default_factory=list)

    @property
    def storage_root(self) -> Path:
        path = local_path(self.settings.resolved_storage_url)
        assert path is not None
        return Path(path)

    @property
    def data_root(self) -> Path:
        return self.settings.resolved_data_root

    @property
    def outside(self) -> Path:
        return self.root / "outside"

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def post_files(
        self, files: list[FileStorage | tuple[Any, str]], token: str | None = None, **fields: Any
    ) -> TestResponse:
        return self.client.post(
            "/api/v1/jobs",
            data={"files": files, **fields},
            content_type="multipart/form-data",
            headers=self.headers(token),
        )

    def post_zip(self, archive: io.BytesIO, name: str = "faces.zip") -> TestResponse:
        return self.post_files([(archive, name)])

    def post_json(self, body: Any) -> TestResponse:
        return self.client.post("/api/v1/jobs", json=body, headers=self.headers())

    def mark(self) -> None:
        """The storage state the row's final request must leave unchanged if refused."""
        self.marked = stored_files(self.storage_root)

    def jobs(self) -> list[Job]:
        with self.app.app_context(), services().sessions() as session:
            return list(session.scalars(select(Job).order_by(Job.created_at)))

    def images(self, job_id: str) -> list[Image]:
        with self.app.app_context(), services().sessions() as session:
            return list(session.scalars(select(Image).where(Image.job_id == uuid.UUID(job_id))))


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def snapshot(ctx: Ctx) -> dict[str, tuple[int, int]]:
    """Every file and link in the sandbox except the storage root and the database files."""
    database = Path(ctx.settings.resolved_database_url.removeprefix("sqlite:///"))
    state: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(ctx.root):
        here = Path(dirpath)
        if here == ctx.storage_root or ctx.storage_root in here.parents:
            dirnames[:] = []
            continue
        for name in filenames + [d for d in dirnames if (here / d).is_symlink()]:
            path = here / name
            if path.parent == database.parent and name.startswith(database.name):
                continue
            info = path.lstat()
            state[str(path.relative_to(ctx.root))] = (info.st_size, info.st_mtime_ns)
    return state


# -- rows -------------------------------------------------------------------------------------


def body_over_limit(ctx: Ctx) -> TestResponse:
    return ctx.post_files([(io.BytesIO(b"\x00" * (MIB + 1)), "big.png")])


def json_body_over_limit(ctx: Ctx) -> TestResponse:
    padding = "x" * (MIB + 1)  # JSON is parsed whole: capped at 1 MiB whatever max_upload_mb
    return ctx.post_json({"folder": "faces", "padding": padding})


def json_training_body_over_limit(ctx: Ctx) -> TestResponse:
    body = {"data": "faces", "overrides": ["training.lr=0.1"] * 200_000}
    return ctx.client.post("/api/v1/training-runs", json=body, headers=ctx.headers(BOOTSTRAP))


def too_many_files(ctx: Ctx) -> TestResponse:
    return ctx.post_files([(io.BytesIO(PNG), f"{i}.png") for i in range(MAX_IMAGES + 1)])


def zip_too_many_images(ctx: Ctx) -> TestResponse:
    return ctx.post_zip(make_zip([(f"{i}.png", PNG) for i in range(MAX_IMAGES + 1)]))


def zip_too_many_entries(ctx: Ctx) -> TestResponse:
    entries = [("a.png", PNG)] + [(f"notes/{i}.txt", b"x") for i in range(1006)]
    return ctx.post_zip(make_zip(entries))


def zip_bomb_ratio(ctx: Ctx) -> TestResponse:
    return ctx.post_zip(make_zip([("bomb.png", b"\x00" * (2 * MIB))]))


def zip_over_total_size(ctx: Ctx) -> TestResponse:
    # Each entry is under the ratio check's floor; together they inflate past 4x the limit.
    entries = [(f"{i}.png", b"\x00" * (MIB - 1)) for i in range(MAX_IMAGES)]
    return ctx.post_zip(make_zip(entries))


def zip_slip(ctx: Ctx) -> TestResponse:
    return ctx.post_zip(make_zip([("ok.png", PNG), ("../../../../slip.png", PNG)]))


def zip_absolute(ctx: Ctx) -> TestResponse:
    return ctx.post_zip(make_zip([("ok.png", PNG), (str(ctx.root / "absolute.png"), PNG)]))


def zip_symlink(ctx: Ctx) -> TestResponse:
    target = str(ctx.outside / "secret.png")
    return ctx.post_zip(make_zip([("ok.png", PNG), symlink_entry("link.png", target)]))


def zip_encrypted(ctx: Ctx) -> TestResponse:
    return ctx.post_zip(encrypted_zip(PNG))


def non_image_part(ctx: Ctx) -> TestResponse:
    part = FileStorage(
        io.BytesIO(b"<script>alert(1)</script>"), "face.png", content_type="text/plain"
    )
    return ctx.post_files([part])


def executable_upload(ctx: Ctx) -> TestResponse:
    part = FileStorage(
        io.BytesIO(b"MZ\x90\x00"), "setup.exe", content_type="application/octet-stream"
    )
    return ctx.post_files([part])


def html_part(ctx: Ctx) -> TestResponse:
    return ctx.post_files([FileStorage(io.BytesIO(PNG), "face.png", content_type="text/html")])


def wrong_content_type(ctx: Ctx) -> TestResponse:
    return ctx.client.post(
        "/api/v1/jobs", data="folder=x", content_type="text/plain", headers=ctx.headers()
    )


def folder_dotdot(ctx: Ctx) -> TestResponse:
    return ctx.post_json({"folder": "../outside"})


def folder_nested_dotdot(ctx: Ctx) -> TestResponse:
    return ctx.post_json({"folder": "faces/../../outside"})


def folder_absolute(ctx: Ctx) -> TestResponse:
    return ctx.post_json({"folder": str(ctx.outside)})


def plant_escaping_links(ctx: Ctx) -> None:
    """Links in the shared data tree that lead out of it (a folder and a file)."""
    (ctx.data_root / "escape").symlink_to(ctx.outside, target_is_directory=True)
    batch = ctx.data_root / "batch"
    batch.mkdir()
    (batch / "ok.png").write_bytes(PNG)
    (batch / "leak.png").symlink_to(ctx.outside / "secret.png")


def folder_symlink_escape(ctx: Ctx) -> TestResponse:
    return ctx.post_json({"folder": "escape"})


def folder_file_symlink_escape(ctx: Ctx) -> TestResponse:
    return ctx.post_json({"folder": "batch"})


def folder_nul(ctx: Ctx) -> TestResponse:
    return ctx.post_json({"folder": "faces\x00/../../etc"})


def folder_lone_surrogate(ctx: Ctx) -> TestResponse:
    return ctx.client.post(
        "/api/v1/jobs",
        data='{"folder": "faces\\ud800"}',
        content_type="application/json",
        headers=ctx.headers(),
    )


def malformed_json(ctx: Ctx) -> TestResponse:
    return ctx.client.post(
        "/api/v1/jobs", data='{"folder": ', content_type="application/json", headers=ctx.headers()
    )


def json_not_an_object(ctx: Ctx) -> TestResponse:
    return ctx.post_json(["faces"])


def batch_size_text(ctx: Ctx) -> TestResponse:
    return ctx.post_json({"folder": "faces", "batch_size": "abc"})


def batch_size_zero(ctx: Ctx) -> TestResponse:
    return ctx.post_json({"folder": "faces", "batch_size": 0})


def recursive_maybe(ctx: Ctx) -> TestResponse:
    return ctx.post_json({"folder": "faces", "recursive": "maybe"})


def model_version_huge(ctx: Ctx) -> TestResponse:
    return ctx.post_json({"folder": "faces", "model_version": 10**20})


def form_batch_size_text(ctx: Ctx) -> TestResponse:
    return ctx.post_files([(io.BytesIO(PNG), "a.png")], batch_size="abc")


def huge_page_and_limit(ctx: Ctx) -> TestResponse:
    assert ctx.post_files([(io.BytesIO(PNG), "a.png")]).status_code == 202
    ctx.mark()
    response = ctx.client.get(f"/api/v1/jobs?page={10**12}&limit={10**9}", headers=ctx.headers())
    body = response.get_json()
    assert body["items"] == [] and body["total"] == 1
    assert body["limit"] == ctx.settings.max_page_size and body["page"] <= 2**31 - 1
    job_id = ctx.jobs()[0].id
    results = ctx.client.get(
        f"/api/v1/jobs/{job_id}/results?page={10**12}&limit={10**9}", headers=ctx.headers()
    )
    assert results.status_code == 200 and results.get_json()["items"] == []
    return response


def decompression_bomb(ctx: Ctx) -> TestResponse:
    response = ctx.post_files([(io.BytesIO(bomb_png()), "bomb.png")])
    body = response.get_json()
    [image] = ctx.images(body["id"])
    location = Path(local_path(image.location) or image.location).resolve()
    assert location.is_relative_to(ctx.storage_root.resolve())
    assert location.read_bytes() == bomb_png()
    return response


def sanitised_filename(ctx: Ctx) -> TestResponse:
    response = ctx.post_files([(io.BytesIO(PNG), "../../../outside/évil name;rm -rf.png")])
    [image] = ctx.images(response.get_json()["id"])
    # Folders of an uploaded name are kept (`submit ./faces` sends Angry/0.png), made safe:
    # the "../" are dropped and the file stays inside its job's folder.
    assert image.path == "outside/evil_namerm_-rf.png"
    location = Path(local_path(image.location) or "").resolve()
    job_dir = (ctx.storage_root / "jobs" / response.get_json()["id"]).resolve()
    assert location.is_relative_to(job_dir) and location.parent.name == "outside"
    return response


def rate_limited(ctx: Ctx) -> TestResponse:
    for _ in range(2):
        assert ctx.post_files([(io.BytesIO(PNG), "a.png")]).status_code == 202
    ctx.mark()
    return ctx.post_files([(io.BytesIO(PNG), "a.png")])


def backlog_full(ctx: Ctx) -> TestResponse:
    assert ctx.post_files([(io.BytesIO(PNG), f"{i}.png") for i in range(2)]).status_code == 202
    ctx.mark()
    return ctx.post_files([(io.BytesIO(PNG), f"{i}.png") for i in range(2)])


def no_token(ctx: Ctx) -> TestResponse:
    return ctx.client.post(
        "/api/v1/jobs",
        data={"files": [(io.BytesIO(PNG), "a.png")]},
        content_type="multipart/form-data",
    )


def revoked_token(ctx: Ctx) -> TestResponse:
    with ctx.app.app_context(), services().sessions() as session:
        [record] = [r for r in db_tokens.list_tokens(session) if r.name == "other"]
        db_tokens.revoke_token(session, record.id)
        session.commit()
    return ctx.post_files([(io.BytesIO(PNG), "a.png")], token=ctx.other_token)


def wrong_role(ctx: Ctx) -> TestResponse:
    return ctx.client.post("/api/v1/training-runs", json={"data": "faces"}, headers=ctx.headers())


def another_tokens_job(ctx: Ctx) -> TestResponse:
    job = ctx.post_files([(io.BytesIO(PNG), "a.png")], token=ctx.other_token).get_json()
    ctx.mark()
    return ctx.client.get(f"/api/v1/jobs/{job['id']}/results", headers=ctx.headers())


@dataclass(frozen=True)
class Row:
    name: str
    send: Callable[[Ctx], TestResponse]
    status: int
    code: str | None
    settings: dict[str, Any] = field(default_factory=dict)
    mentions: str | None = None
    headers: tuple[str, ...] = ()
    #: Sets the scene before the sandbox is snapshotted.
    prepare: Callable[[Ctx], None] | None = None


ROWS = [
    Row("body over max_upload_mb", body_over_limit, 413, "payload_too_large"),
    Row(
        "JSON body over 1 MiB",
        json_body_over_limit,
        413,
        "payload_too_large",
        settings={"max_upload_mb": 64},
    ),
    Row(
        "training-run JSON over 1 MiB",
        json_training_body_over_limit,
        413,
        "payload_too_large",
        settings={"max_upload_mb": 64},
    ),
    Row("too many files in one upload", too_many_files, 400, "too_many_images"),
    Row("zip with too many images", zip_too_many_images, 400, "too_many_images"),
    Row("zip with too many entries", zip_too_many_entries, 400, "unsafe_zip"),
    Row("zip bomb by ratio", zip_bomb_ratio, 400, "unsafe_zip", mentions="ratio"),
    Row("zip over the total size", zip_over_total_size, 413, "too_large"),
    Row("zip slip ../", zip_slip, 400, "unsafe_zip", mentions=".."),
    Row("zip absolute path", zip_absolute, 400, "unsafe_zip", mentions="absolute"),
    Row("zip symlink entry", zip_symlink, 400, "unsafe_zip", mentions="symbolic link"),
    Row("zip encrypted entry", zip_encrypted, 400, "unsafe_zip", mentions="encrypted"),
    Row("text/plain part named .png", non_image_part, 400, "unsupported_file"),
    Row("text/html part", html_part, 400, "unsupported_file"),
    Row(".exe upload", executable_upload, 400, "unsupported_file", mentions="setup.exe"),
    Row("text/plain request body", wrong_content_type, 415, "unsupported_media_type"),
    Row("folder ..", folder_dotdot, 400, "invalid_path"),
    Row("folder nested ..", folder_nested_dotdot, 400, "invalid_path"),
    Row("folder absolute", folder_absolute, 400, "invalid_path"),
    Row(
        "folder symlink escaping",
        folder_symlink_escape,
        400,
        "invalid_path",
        prepare=plant_escaping_links,
    ),
    Row(
        "folder file symlink escaping",
        folder_file_symlink_escape,
        400,
        "invalid_path",
        mentions="outside the data root",
        prepare=plant_escaping_links,
    ),
    Row("folder with NUL", folder_nul, 400, "validation_error", mentions="folder"),
    Row("folder lone surrogate", folder_lone_surrogate, 400, "validation_error", mentions="folder"),
    Row("malformed JSON", malformed_json, 400, "invalid_json"),
    Row("JSON array body", json_not_an_object, 400, "invalid_json"),
    Row("batch_size 'abc'", batch_size_text, 400, "validation_error", mentions="batch_size"),
    Row("batch_size 0", batch_size_zero, 400, "validation_error", mentions="batch_size"),
    Row("recursive 'maybe'", recursive_maybe, 400, "validation_error", mentions="recursive"),
    Row(
        "model_version 1e20", model_version_huge, 400, "validation_error", mentions="model_version"
    ),
    Row(
        "form batch_size 'abc'",
        form_batch_size_text,
        400,
        "validation_error",
        mentions="batch_size",
    ),
    Row("page 1e12, limit 1e9", huge_page_and_limit, 200, None),
    Row("decompression-bomb PNG", decompression_bomb, 202, None),
    Row("hostile file name", sanitised_filename, 202, None),
    Row(
        "rate limit",
        rate_limited,
        429,
        "rate_limited",
        settings={"submit_rate_limit": "2/minute", "broker_url": "REDIS"},
        headers=("Retry-After",),
    ),
    Row(
        "backlog over max_queued_images",
        backlog_full,
        503,
        "overloaded",
        settings={"max_queued_images": 3},
        headers=("Retry-After",),
    ),
    Row("no token", no_token, 401, "unauthorized", headers=("WWW-Authenticate",)),
    Row("revoked token", revoked_token, 401, "unauthorized", headers=("WWW-Authenticate",)),
    Row("submit token on an admin route", wrong_role, 403, "forbidden"),
    Row("another token's job", another_tokens_job, 404, "not_found"),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_hostile_input(row: Row, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    overrides = dict(row.settings)
    if overrides.get("broker_url") == "REDIS":
        overrides["broker_url"] = request.getfixturevalue("redis_url")
    (tmp_path / "data" / "faces").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_bytes(PNG)
    values: dict[str, Any] = {
        "var_dir": tmp_path / "var",
        "data_root": tmp_path / "data",
        "admin_token": BOOTSTRAP,
        "auth": "enabled",
        "broker_url": "memory://",
        "max_upload_mb": 1,
        "max_images_per_job": MAX_IMAGES,
        "batch_size": 2,
        "chunk_batches": 1,
    }
    settings = Settings(**{**values, **overrides})
    queue = FakeQueue()
    app = create_app(settings, broker=queue, registry_factory=lambda: None)
    with app.app_context(), services().sessions() as session:
        token = db_tokens.create_token(session, role="submit", name="me").token
        other = db_tokens.create_token(session, role="submit", name="other").token
        session.commit()
    ctx = Ctx(tmp_path, settings, app, app.test_client(), token, other, queue)
    if row.prepare is not None:
        row.prepare(ctx)
    before = snapshot(ctx)
    ctx.mark()

    response = row.send(ctx)

    assert response.status_code == row.status, response.get_data(as_text=True)[:500]
    body = response.get_json()
    assert isinstance(body, dict)
    if row.code is not None:
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
        assert body["error"]["code"] == row.code, body
        assert body["error"]["message"]
        if row.mentions:
            assert row.mentions in body["error"]["message"], body
        # A refusal stores nothing and queues nothing new.
        assert stored_files(ctx.storage_root) == ctx.marked
    for header in row.headers:
        assert response.headers.get(header), (header, dict(response.headers))
    if "Retry-After" in row.headers:
        assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert token not in response.get_data(as_text=True)
    # Nothing outside the storage root was created, changed or removed.
    assert snapshot(ctx) == before
    leftovers = [p for p in stored_files(ctx.storage_root) if "jobs" not in p.parts]
    assert leftovers == []
