"""Job submission in the core, without Flask: what is stored, committed and sent, in order."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

from face_emotions.jobs.database import create_db_engine
from face_emotions.jobs.database import session_factory
from face_emotions.jobs.intake import IntakeError
from face_emotions.jobs.migrate import upgrade
from face_emotions.jobs.schema import Job
from face_emotions.jobs.submission import FolderSource
from face_emotions.jobs.submission import JobOptions
from face_emotions.jobs.submission import UploadSource
from face_emotions.jobs.submission import find_replay
from face_emotions.jobs.submission import submit_job
from face_emotions.settings import Settings
from tests.fakes import ChunkOnlyBroker as Sender


class Refused(Exception):
    pass


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    (tmp_path / "data").mkdir()
    return Settings(var_dir=tmp_path / "var", data_root=tmp_path / "data", chunk_batches=1)


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    engine = create_db_engine(settings.resolved_database_url)
    yield session_factory(engine)
    engine.dispose()


def png() -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def uploads(*names: str, batch_size: int = 2) -> UploadSource:
    return UploadSource(
        files=[(name, io.BytesIO(png())) for name in names],
        options=JobOptions(batch_size=batch_size),
    )


def stored(settings: Settings) -> list[Path]:
    root = settings.var_dir / "storage" / "jobs"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def submit(session: Session, settings: Settings, source, sender: Sender, **kwargs):
    return submit_job(
        session,
        settings,
        source,
        owner=kwargs.pop("owner", "t1"),
        idempotency_key=kwargs.pop("idempotency_key", None),
        broker=sender,
        check_capacity=kwargs.pop("check_capacity", lambda count: None),
    )


def test_uploads_are_stored_committed_then_sent_in_chunks(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    sender = Sender()
    with sessions() as session:
        submitted = submit(session, settings, uploads("a.png", "b.png", "c.png"), sender)
    job = submitted.job
    assert (submitted.replayed, submitted.dispatched, submitted.skipped) == (False, True, None)
    assert (job.source_type, job.source, job.total, job.chunks) == ("upload", "3 files", 3, 2)
    assert [len(ids) for _job_id, ids in sender.chunks] == [2, 1]
    assert {job_id for job_id, _ids in sender.chunks} == {str(job.id)}
    assert len(stored(settings)) == 3
    with sessions() as session:
        assert session.get(Job, job.id) is not None


def test_a_broker_outage_leaves_the_job_queued(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    sender = Sender()
    sender.up = False
    with sessions() as session:
        submitted = submit(session, settings, uploads("a.png"), sender)
    assert submitted.dispatched is False
    with sessions() as session:
        assert str(session.get(Job, submitted.job.id).status) == "queued"


def test_a_refusal_after_storing_leaves_no_job_and_no_files(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.png", png())
        zf.writestr("b.png", png())
    archive.seek(0)
    counts: list[int] = []

    def refuse(count: int) -> None:
        counts.append(count)
        raise Refused

    source = UploadSource(files=[("faces.zip", archive)], options=JobOptions(batch_size=2))
    with sessions() as session, pytest.raises(Refused):
        submit(session, settings, source, Sender(), check_capacity=refuse)
    assert counts == [2]  # checked once the zip's count was known, i.e. after extracting
    assert stored(settings) == []
    with sessions() as session:
        assert session.scalars(select(Job)).all() == []


def test_a_zip_must_come_alone(sessions: sessionmaker[Session], settings: Settings) -> None:
    with sessions() as session, pytest.raises(IntakeError) as refused:
        submit(session, settings, uploads("a.zip", "b.png"), Sender())
    assert refused.value.code == "unsupported_file"
    assert stored(settings) == []


def test_folders_and_idempotent_replays(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    faces = Path(settings.data_root) / "faces"
    faces.mkdir()
    (faces / "a.png").write_bytes(png())
    source = FolderSource(folder="faces", recursive=True, options=JobOptions(batch_size=4))
    with sessions() as session:
        job = submit(session, settings, source, Sender(), idempotency_key="k").job
        assert (job.source_type, job.source, job.total) == ("folder", "faces", 1)
        assert find_replay(session, "t1", "k") == job
        assert find_replay(session, "t2", "k") is None
        assert find_replay(session, "t1", None) is None


def test_the_core_imports_without_flask() -> None:
    code = (
        "import sys, face_emotions.jobs.submission; "
        "sys.exit(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'flask', 'werkzeug', 'apiflask'}) or 0)"
    )
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo)
