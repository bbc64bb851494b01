"""Uploads that belong to no job (issue 14: an API killed mid-upload left 250 files that nothing
removed): the sweeper's pass over ``<storage>/jobs/``, on a local disk and on S3 (moto).

The real crash (a SIGKILLed gunicorn) is in tests/integration/test_recovery_sweeper.py.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

from face_emotions.data.storage import Storage
from face_emotions.jobs import job_queries
from face_emotions.jobs.orphan_uploads import remove_orphan_uploads
from face_emotions.settings import Settings
from tests.s3_fixtures import MotoServer

HOUR = 3600.0


def job_with_uploads(sessions: sessionmaker[Session], storage: Storage) -> str:
    """A committed job whose one image is stored under ``jobs/<id>/``, as the API makes it."""
    job_id = uuid.uuid4()
    storage.write_bytes(f"jobs/{job_id}/a.png", b"png")
    with sessions() as session:
        job_queries.create_job(
            session,
            job_id=job_id,
            source_type="upload",
            source="1 file",
            images=[job_queries.NewImage("a.png", storage.url_for(f"jobs/{job_id}/a.png"))],
            batch_size=2,
            chunk_size=4,
        )
        session.commit()
    return f"jobs/{job_id}"


def orphan(storage: Storage, files: int = 3) -> str:
    """What a killed upload leaves: files under a job id that no row has."""
    prefix = f"jobs/{uuid.uuid4()}"
    for number in range(files):
        storage.write_bytes(f"{prefix}/sub/{number}.png", b"x" * 10)
    return prefix


def test_local_orphans_are_removed_after_the_grace_period(
    tmp_path: Path, jobs_db: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    storage = Storage.from_url(tmp_path / "storage")
    kept = job_with_uploads(jobs_db, storage)
    lost = orphan(storage)
    storage.write_bytes("jobs/not-a-job-id/x.png", b"x")  # not ours: never touched
    storage.write_bytes("thumbnails/x.png", b"x")
    empty = f"jobs/{uuid.uuid4()}"  # a folder emptied by a failed request's own cleanup
    (tmp_path / "storage" / empty).mkdir(parents=True)

    young = remove_orphan_uploads(jobs_db, storage, grace_seconds=HOUR)
    assert young.removed == [] and young.too_recent == 2
    assert storage.find(lost) != []

    caplog.set_level(logging.WARNING, logger="face_emotions.jobs.orphan_uploads")
    report = remove_orphan_uploads(jobs_db, storage, grace_seconds=HOUR, now=time.time() + HOUR)
    assert sorted(report.removed) == sorted([lost, empty])
    assert (report.files, report.bytes) == (3, 30)
    assert not storage.is_dir(lost) and not (tmp_path / "storage" / empty).exists()
    assert storage.find(kept) == [f"{kept}/a.png"]
    assert storage.exists("jobs/not-a-job-id/x.png") and storage.exists("thumbnails/x.png")
    # The path itself may be redacted (earlier tests register secrets with the one redactor).
    removal = [line for line in caplog.text.splitlines() if lost.rsplit("/", 1)[1] in line]
    assert any(
        "removed orphaned upload" in line and "3 files, 30 bytes" in line for line in removal
    )
    assert remove_orphan_uploads(jobs_db, storage, grace_seconds=0).removed == []


def test_an_upload_still_being_written_is_kept(
    tmp_path: Path, jobs_db: sessionmaker[Session]
) -> None:
    """Age is that of the newest file: an old first file does not make a live upload old."""
    storage = Storage.from_url(tmp_path / "storage")
    prefix = orphan(storage, files=2)
    old = time.time() - 2 * HOUR
    os.utime(tmp_path / "storage" / prefix / "sub" / "0.png", (old, old))
    assert remove_orphan_uploads(jobs_db, storage, grace_seconds=HOUR).removed == []
    assert storage.is_dir(prefix)


def test_no_storage_yet_is_nothing_to_do(tmp_path: Path, jobs_db: sessionmaker[Session]) -> None:
    storage = Storage.from_url(tmp_path / "never-written")
    assert remove_orphan_uploads(jobs_db, storage, grace_seconds=0).removed == []


def test_s3_orphans_are_removed(moto_server: MotoServer, jobs_db: sessionmaker[Session]) -> None:
    bucket = moto_server.create_bucket(f"orphans-{uuid.uuid4().hex[:12]}")
    storage = Storage.from_url(f"s3://{bucket}/up", s3_endpoint_url=moto_server.endpoint_url)
    kept = job_with_uploads(jobs_db, storage)
    lost = orphan(storage)
    moto_server.put(bucket, "up/jobs/readme.txt", b"not ours")

    assert remove_orphan_uploads(jobs_db, storage, grace_seconds=HOUR).too_recent == 1
    report = remove_orphan_uploads(jobs_db, storage, grace_seconds=HOUR, now=time.time() + HOUR)
    assert report.removed == [lost] and report.files == 3
    assert moto_server.keys(bucket) == [f"up/{kept}/a.png", "up/jobs/readme.txt"]


def test_the_worker_sweeper_removes_orphans(tmp_path: Path, jobs_db) -> None:
    """Wired into the sweep of :class:`worker.recovery.RecoverySweeper`, with the setting."""
    from face_emotions.jobs.broker import BrokerClient
    from worker.recovery import RecoverySweeper

    storage = Storage.from_url(tmp_path / "storage")
    lost = orphan(storage)
    settings = Settings(
        var_dir=tmp_path,
        database_url=str(jobs_db.kw["bind"].url),
        storage_url=str(tmp_path / "storage"),
        orphan_upload_grace_seconds=0,
    )
    sweeper = RecoverySweeper(BrokerClient("memory://"), settings)
    try:
        report = sweeper.run_once()
    finally:
        sweeper.stop()
    assert report is not None and report.orphan_uploads_removed == [lost]
    assert report.as_dict()["orphan_uploads_removed"] == [lost] and not report.idle
    assert not storage.is_dir(lost)


def test_the_default_grace_period() -> None:
    assert Settings().orphan_upload_grace_seconds == HOUR
