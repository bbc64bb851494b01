"""Every result of a job as one streamed download: JSON Lines (one line per image, with its
``faces``) or CSV (one row per face, with the face's index and box). CSV cells that a
spreadsheet would run as a formula (an image named ``=HYPERLINK(...).png``) start with ``'``
(:mod:`face_emotions.ops.csv_cells`).

A job may hold millions of results, so the body is a generator that Flask streams after the
view has returned: it reads keyset pages with short-lived sessions of its own (the request's
session is closed by then) and never holds more than one page in memory.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Response
from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

from api.serialize import result_dict
from face_emotions.jobs import job_queries
from face_emotions.jobs.schema import Image
from face_emotions.labels import EMOTIONS
from face_emotions.ops.csv_cells import csv_writer

#: Rows per keyset page (and per short-lived session).
EXPORT_BATCH = 1000
#: CSV rows buffered before a piece of the body is sent.
CSV_FLUSH_ROWS = 500
MIMETYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv"}

CSV_COLUMNS: tuple[str, ...] = (
    "image_path",
    "status",
    "face_index",
    "faces_found",
    "whole_image",
    "box_x0",
    "box_y0",
    "box_x1",
    "box_y1",
    "face_score",
    "predicted_class",
    "predicted_emotion",
    "confidence",
    *EMOTIONS,
    "model_version",
    "error",
)


def export_response(
    sessions: sessionmaker[Session],
    job_id: uuid.UUID,
    fmt: str,
    *,
    emotion: str | None,
    status: str | None,
    no_face: bool | None = None,
) -> Response:
    """The streamed attachment for ``format=jsonl`` or ``format=csv``."""
    records = iter_records(sessions, job_id, emotion=emotion, status=status, no_face=no_face)
    body = jsonl_lines(records) if fmt == "jsonl" else csv_lines(records)
    return Response(
        body,
        mimetype=MIMETYPES[fmt],
        headers={"Content-Disposition": f'attachment; filename="{job_id}-results.{fmt}"'},
    )


def iter_records(
    sessions: sessionmaker[Session],
    job_id: uuid.UUID,
    *,
    emotion: str | None,
    status: str | None,
    no_face: bool | None = None,
) -> Iterator[dict[str, Any]]:
    """Every result in position order, read in keyset pages with short-lived sessions.

    The export outlives the request's session (the body streams after the view returns) and
    may be millions of rows; keyset paging keeps memory flat and no transaction open long.
    """
    last = -1
    while True:
        with sessions() as session:
            rows = session.execute(
                job_queries.results_query(job_id, emotion=emotion, status=status, no_face=no_face)
                .where(Image.position > last)
                .limit(EXPORT_BATCH)
            ).all()
            records = [result_dict(image, result) for image, result in rows]
        yield from records
        if len(rows) < EXPORT_BATCH:
            return
        last = rows[-1][0].position


def jsonl_lines(records: Iterator[dict[str, Any]]) -> Iterator[str]:
    return (json.dumps(record) + "\n" for record in records)


def csv_lines(records: Iterator[dict[str, Any]]) -> Iterator[str]:
    """The CSV body in pieces of :data:`CSV_FLUSH_ROWS` rows, header first; no cell of it can
    run as a spreadsheet formula."""
    buffer = io.StringIO()
    writer = csv_writer(buffer)
    writer.writerow(CSV_COLUMNS)
    count = 0
    for record in records:
        for row in csv_rows(record):
            writer.writerow(row)
            count += 1
        if count >= CSV_FLUSH_ROWS:
            count = 0
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def csv_rows(record: dict[str, Any]) -> list[list[Any]]:
    """One row per face of a record (one row for a failed image, or a result from before face
    detection), flattened to :data:`CSV_COLUMNS` with one column per emotion's probability."""
    faces = record.get("faces") or [None]
    rows = []
    for face in faces:
        source = face or record
        probabilities = source.get("all_probabilities") or {}
        box = face["box"] if face else [None] * 4
        rows.append(
            [
                record["image_path"],
                record["status"],
                face["index"] if face else None,
                record.get("faces_found"),
                face["whole_image"] if face else None,
                *box,
                face.get("score") if face else None,
                source.get("predicted_class"),
                source.get("predicted_emotion"),
                source.get("confidence"),
                *(probabilities.get(name) for name in EMOTIONS),
                record["model_version"],
                record.get("error"),
            ]
        )
    return rows
