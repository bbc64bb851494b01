"""Recovery of lost and failing chunks, against a temporary SQLite database.

Three places bound a chunk's life: the sweeper (re-enqueues stalled jobs, gives up on chunks out
of deliveries), the chunk classifier (counts deliveries, gives up at the start of one too many)
and the Celery task (retries unexpected failures with backoff, then fails the images with the
reason). Each is tested here without a broker: the sweeper takes an ``enqueue`` callable, the
task runs eagerly.
"""

from __future__ import annotations

import uuid
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy import update
from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

from face_emotions.faces.crop import CropSpec
from face_emotions.jobs import job_queries
from face_emotions.jobs import recovery_queries
from face_emotions.jobs import result_writes
from face_emotions.jobs.recovery import gave_up_reason
from face_emotions.jobs.recovery import sweep
from face_emotions.jobs.schema import Image
from face_emotions.jobs.schema import Job
from face_emotions.jobs.schema import JobStatus
from face_emotions.jobs.schema import Result
from face_emotions.serving.chunk_classifier import classify_chunk
from face_emotions.serving.model_holder import ModelUnavailable
from face_emotions.serving.model_holder import ServingModel
from face_emotions.settings import Settings
from tests.fakes import ChunkOnlyBroker as Recorder

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
STALL = 60.0
MAX = 3


@pytest.fixture
def sessions(jobs_db: sessionmaker[Session]) -> sessionmaker[Session]:
    return jobs_db


def make_job(
    sessions: sessionmaker[Session],
    count: int = 10,
    chunk_size: int = 4,
    *,
    status: JobStatus = JobStatus.RUNNING,
    created_at: datetime = T0,
    progressed_at: datetime | None = T0,
) -> tuple[uuid.UUID, dict[int, list[int]]]:
    with sessions() as session:
        job = job_queries.create_job(
            session,
            source_type="folder",
            source="faces",
            images=[job_queries.NewImage(f"{i}.png", f"/nowhere/{i}.png") for i in range(count)],
            batch_size=2,
            chunk_size=chunk_size,
        )
        session.flush()
        session.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(status=status, created_at=created_at, progressed_at=progressed_at)
        )
        chunks = job_queries.chunk_image_ids(session, job.id)
        session.commit()
        return job.id, chunks


def succeed(sessions: sessionmaker[Session], job_id: uuid.UUID, image_ids: list[int]) -> None:
    """Predictions for these images, made at ``T0`` (the tests' clock, not the machine's)."""
    with sessions() as session:
        rows = [
            result_writes.ResultRow(i, probabilities=[0.1, 0.1, 0.6, 0.1, 0.1]) for i in image_ids
        ]
        result_writes.record_results(session, job_id, rows, model_version=1, worker="test")
        session.execute(update(Job).where(Job.id == job_id).values(progressed_at=T0))
        session.commit()


def set_attempts(sessions: sessionmaker[Session], image_ids: list[int], attempts: int) -> None:
    with sessions() as session:
        session.execute(update(Image).where(Image.id.in_(image_ids)).values(attempts=attempts))
        session.commit()


def job_row(sessions: sessionmaker[Session], job_id: uuid.UUID) -> Job:
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def attempts_of(sessions: sessionmaker[Session], job_id: uuid.UUID) -> list[int]:
    with sessions() as session:
        return list(
            session.scalars(
                select(Image.attempts).where(Image.job_id == job_id).order_by(Image.position)
            )
        )


def results_of(sessions: sessionmaker[Session], job_id: uuid.UUID) -> list[Result]:
    with sessions() as session:
        return list(session.scalars(select(Result).where(Result.job_id == job_id)))


def run_sweep(sessions: sessionmaker[Session], enqueue: Recorder, now: datetime):
    return sweep(sessions, enqueue, stall_seconds=STALL, max_attempts=MAX, now=now)


def naive(value: datetime | None) -> datetime | None:
    """SQLite hands timestamps back without their zone; compare in UTC."""
    return None if value is None else value.replace(tzinfo=None)


# --- the sweeper -----------------------------------------------------------------------------


def test_stalled_job_gets_only_its_pending_chunks_again(sessions) -> None:
    job_id, chunks = make_job(sessions, 10, 4)  # chunks of 4, 4, 2
    succeed(sessions, job_id, chunks[0])
    succeed(sessions, job_id, chunks[1][:2])
    enqueue = Recorder()
    now = T0 + timedelta(seconds=STALL + 1)

    report = run_sweep(sessions, enqueue, now)

    assert enqueue.chunks == [(str(job_id), chunks[1][2:]), (str(job_id), chunks[2])]
    assert report.jobs == [str(job_id)]
    assert (report.chunks_enqueued, report.images_enqueued, report.images_failed) == (2, 4, 0)
    job = job_row(sessions, job_id)
    assert naive(job.progressed_at) == naive(now), "the job is claimed for one stall period"
    assert job.status == JobStatus.RUNNING
    # Delivery counting is the worker's: re-sending a chunk is not a delivery.
    assert attempts_of(sessions, job_id) == [0] * 10


def test_a_job_that_progressed_recently_is_left_alone(sessions) -> None:
    job_id, _ = make_job(sessions, progressed_at=T0)
    enqueue = Recorder()
    report = run_sweep(sessions, enqueue, T0 + timedelta(seconds=STALL - 1))
    assert enqueue.chunks == [] and report.idle
    assert naive(job_row(sessions, job_id).progressed_at) == naive(T0)


@pytest.mark.parametrize(
    "status",
    [
        JobStatus.SUCCEEDED,
        JobStatus.COMPLETED_WITH_ERRORS,
        JobStatus.FAILED,
        JobStatus.CANCELLED,
    ],
)
def test_finished_and_cancelled_jobs_are_left_alone(sessions, status: JobStatus) -> None:
    make_job(sessions, status=status, progressed_at=T0 - timedelta(days=1))
    enqueue = Recorder()
    assert run_sweep(sessions, enqueue, T0 + timedelta(hours=1)).idle
    assert enqueue.chunks == []


def test_a_queued_job_that_was_never_dispatched_is_sent(sessions) -> None:
    """The API committed the job but could not reach the broker: no chunk ever started."""
    job_id, chunks = make_job(
        sessions, 6, 4, status=JobStatus.QUEUED, created_at=T0, progressed_at=None
    )
    enqueue = Recorder()
    report = run_sweep(sessions, enqueue, T0 + timedelta(seconds=STALL + 1))
    assert enqueue.chunks == [(str(job_id), chunks[0]), (str(job_id), chunks[1])]
    assert report.images_enqueued == 6
    assert job_row(sessions, job_id).status == JobStatus.QUEUED


def test_a_second_sweep_within_the_stall_period_does_nothing(sessions) -> None:
    job_id, chunks = make_job(sessions, 4, 4)
    enqueue = Recorder()
    first = T0 + timedelta(seconds=STALL + 1)
    run_sweep(sessions, enqueue, first)
    assert len(enqueue.chunks) == 1
    # Another worker's sweeper a little later: the job is claimed for a stall period.
    assert run_sweep(sessions, enqueue, first + timedelta(seconds=STALL / 2)).idle
    assert len(enqueue.chunks) == 1
    # Still no progress one more stall period on: sent again.
    run_sweep(sessions, enqueue, first + timedelta(seconds=STALL + 1))
    assert enqueue.chunks == [(str(job_id), chunks[0])] * 2


def test_two_sweepers_cannot_both_claim_a_job(sessions) -> None:
    job_id, _ = make_job(sessions)
    now = T0 + timedelta(seconds=STALL + 1)
    cutoff = now - timedelta(seconds=STALL)
    with sessions() as session:
        # Both found the job stalled; only the first UPDATE still matches.
        assert recovery_queries.stalled_job_ids(session, cutoff=cutoff, limit=10) == [job_id]
        assert recovery_queries.claim_stalled_job(session, job_id, cutoff=cutoff, now=now)
        session.commit()
    with sessions() as session:
        assert not recovery_queries.claim_stalled_job(session, job_id, cutoff=cutoff, now=now)


def test_chunks_out_of_deliveries_are_failed_and_the_job_terminates(sessions) -> None:
    job_id, chunks = make_job(sessions, 8, 4)
    succeed(sessions, job_id, chunks[0])
    set_attempts(sessions, chunks[1], MAX)
    enqueue = Recorder()

    report = run_sweep(sessions, enqueue, T0 + timedelta(seconds=STALL + 1))

    assert enqueue.chunks == []
    assert (report.chunks_given_up, report.images_failed) == (1, 4)
    job = job_row(sessions, job_id)
    assert (job.status, job.done, job.failed) == (JobStatus.COMPLETED_WITH_ERRORS, 4, 4)
    assert job.finished_at is not None
    failed = [r for r in results_of(sessions, job_id) if r.status == "failed"]
    assert sorted(r.image_id for r in failed) == chunks[1]
    assert {r.error for r in failed} == {gave_up_reason(MAX)}
    assert gave_up_reason(MAX) == f"gave up after {MAX} deliveries without a result"


def test_a_job_whose_every_chunk_gives_up_fails(sessions) -> None:
    job_id, chunks = make_job(sessions, 5, 4)
    set_attempts(sessions, chunks[0] + chunks[1], MAX + 2)
    run_sweep(sessions, Recorder(), T0 + timedelta(seconds=STALL + 1))
    job = job_row(sessions, job_id)
    assert (job.status, job.done, job.failed) == (JobStatus.FAILED, 0, 5)
    assert len(results_of(sessions, job_id)) == 5


def test_chunks_with_deliveries_left_are_sent_beside_those_given_up(sessions) -> None:
    job_id, chunks = make_job(sessions, 8, 4)
    set_attempts(sessions, chunks[0], MAX)
    set_attempts(sessions, chunks[1], MAX - 1)
    enqueue = Recorder()
    report = run_sweep(sessions, enqueue, T0 + timedelta(seconds=STALL + 1))
    assert enqueue.chunks == [(str(job_id), chunks[1])]
    assert (report.chunks_given_up, report.chunks_enqueued) == (1, 1)
    assert job_row(sessions, job_id).status == JobStatus.RUNNING


def test_broker_down_releases_the_claim_for_the_next_sweep(sessions) -> None:
    job_id, chunks = make_job(sessions, 4, 4)
    enqueue = Recorder()
    enqueue.up = False
    now = T0 + timedelta(seconds=STALL + 1)

    report = run_sweep(sessions, enqueue, now)

    assert report.enqueue_error is not None and "broker down" in report.enqueue_error
    assert naive(job_row(sessions, job_id).progressed_at) == naive(T0), "claim not released"
    enqueue.up = True
    run_sweep(sessions, enqueue, now + timedelta(seconds=1))
    assert enqueue.chunks == [(str(job_id), chunks[0])]


def test_the_longest_stalled_jobs_go_first_and_the_rest_wait(sessions) -> None:
    newer, _ = make_job(sessions, 2, 4, progressed_at=T0)
    older, _ = make_job(sessions, 2, 4, progressed_at=T0 - timedelta(minutes=5))
    enqueue = Recorder()
    now = T0 + timedelta(seconds=STALL + 1)
    sweep(sessions, enqueue, stall_seconds=STALL, max_attempts=MAX, now=now, limit=1)
    assert [job for job, _ in enqueue.chunks] == [str(older)]
    sweep(sessions, enqueue, stall_seconds=STALL, max_attempts=MAX, now=now, limit=1)
    assert [job for job, _ in enqueue.chunks] == [str(older), str(newer)]


# --- delivery counting in the chunk classifier ----------------------------------------------


class FakePredictor:
    backend = "torch"
    spec = SimpleNamespace(crop=CropSpec())  # a whole-image model's default crop

    def predict_images(self, images):
        return [[0.1, 0.1, 0.6, 0.1, 0.1] for _ in images]


class FakeHolder:
    """Serves version 1, or raises what it is given."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.asked = 0

    @property
    def serving_version(self) -> int | None:
        """Like a real holder: nothing is served before the first successful load."""
        return 1 if self.asked and self.error is None else None

    def for_job(self, pinned: int | None) -> ServingModel:
        self.asked += 1
        if self.error is not None:
            raise self.error
        return ServingModel(1, FakePredictor())  # type: ignore[arg-type]

    def describe(self) -> dict:
        return {"version": 1, "device": "cpu", "backend": "torch"}


def a_face(location: str, max_pixels: int) -> PILImage.Image:
    return PILImage.new("RGB", (8, 8))


def disk_on_fire(location: str, max_pixels: int) -> PILImage.Image:
    raise RuntimeError("disk on fire at s3://admin:hunter2@store/faces")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(var_dir=tmp_path, max_chunk_attempts=MAX, decode_threads=1)


def test_each_delivery_counts_once_per_pending_image(sessions, settings) -> None:
    job_id, chunks = make_job(sessions, 4, 4, status=JobStatus.QUEUED, progressed_at=None)
    succeed(sessions, job_id, chunks[0][:1])
    outcome = classify_chunk(
        sessions, FakeHolder(), job_id, chunks[0], settings=settings, load_image=a_face
    )
    assert (outcome.succeeded, outcome.already_done, outcome.attempt) == (3, 1, 1)
    assert attempts_of(sessions, job_id) == [0, 1, 1, 1]
    assert job_row(sessions, job_id).status == JobStatus.SUCCEEDED
    # A redelivery of the finished chunk skips it and counts nothing.
    again = classify_chunk(
        sessions, FakeHolder(), job_id, chunks[0], settings=settings, load_image=a_face
    )
    assert again.skipped and again.attempt == 0
    assert attempts_of(sessions, job_id) == [0, 1, 1, 1]


def test_waiting_for_a_model_is_not_a_delivery(sessions, settings) -> None:
    job_id, chunks = make_job(sessions, 4, 4)
    holder = FakeHolder(ModelUnavailable("no champion yet"))
    for _ in range(MAX + 2):
        with pytest.raises(ModelUnavailable):
            classify_chunk(sessions, holder, job_id, chunks[0], settings=settings)
    assert attempts_of(sessions, job_id) == [0] * 4
    assert results_of(sessions, job_id) == []
    # Chunks waiting for a model retry by themselves: the job is not stalled meanwhile.
    assert naive(job_row(sessions, job_id).progressed_at) > naive(T0)


def test_a_delivery_past_the_limit_gives_up_without_working(sessions, settings) -> None:
    """A chunk that kills its worker every time is redelivered by the broker forever; the
    delivery after the last one fails its images instead of trying again."""
    job_id, chunks = make_job(sessions, 4, 4)
    succeed(sessions, job_id, chunks[0][:1])
    set_attempts(sessions, chunks[0][1:], MAX)
    holder = FakeHolder(AssertionError("no model needed to give up"))

    outcome = classify_chunk(
        sessions, holder, job_id, chunks[0], settings=settings, load_image=a_face
    )

    assert holder.asked == 0
    assert outcome.failed == 3 and outcome.skipped
    job = job_row(sessions, job_id)
    assert (job.status, job.done, job.failed) == (JobStatus.COMPLETED_WITH_ERRORS, 1, 3)
    errors = {r.error for r in results_of(sessions, job_id) if r.status == "failed"}
    assert errors == {gave_up_reason(MAX)}


def test_a_cancel_lands_between_micro_batches(
    sessions, settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check runs in a write's transaction, on the writer thread, never on the model's:
    the chunk stops at a later micro-batch."""
    import threading

    from face_emotions.serving import chunk_classifier

    monkeypatch.setattr(chunk_classifier, "STATUS_INTERVAL_SECONDS", 0.0)
    checked_on: list[str] = []
    real_job_ended = chunk_classifier._job_ended

    def job_ended(session, job):
        checked_on.append(threading.current_thread().name)
        return real_job_ended(session, job)

    monkeypatch.setattr(chunk_classifier, "_job_ended", job_ended)
    job_id, chunks = make_job(sessions, 8, 8)
    loaded: list[str] = []

    def cancel_on_third(location: str, max_pixels: int) -> PILImage.Image:
        loaded.append(location)
        if len(loaded) == 3:
            with sessions() as session:
                session.execute(
                    update(Job).where(Job.id == job_id).values(status=JobStatus.CANCELLED)
                )
                session.commit()
        return a_face(location, max_pixels)

    outcome = classify_chunk(
        sessions, FakeHolder(), job_id, chunks[0], settings=settings, load_image=cancel_on_third
    )
    assert outcome.skipped == "job was cancelled"
    assert 0 < outcome.succeeded < 8
    assert checked_on and all(name.startswith("result-writer") for name in checked_on)


def test_status_checks_and_heartbeats_are_throttled(
    sessions, settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One database round trip per micro-batch (its write): the cancel check and the worker
    heartbeat come at most every STATUS_INTERVAL_SECONDS; the heartbeat is throttled per
    process, so a stream of small chunks does not pay one each, and carries what it skipped."""
    from face_emotions.serving import chunk_classifier

    monkeypatch.setattr(chunk_classifier, "STATUS_INTERVAL_SECONDS", 3600.0)
    calls = {"cancelled": 0, "heartbeat": []}
    real_job_ended = chunk_classifier._job_ended

    def counting_cancelled(*args):
        calls["cancelled"] += 1
        return real_job_ended(*args)

    def counting_heartbeat(sessions, holder, worker_name, processed):
        calls["heartbeat"].append(processed)

    monkeypatch.setattr(chunk_classifier, "_job_ended", counting_cancelled)
    monkeypatch.setattr(chunk_classifier, "_heartbeat", counting_heartbeat)
    holder = FakeHolder()
    job_id, chunks = make_job(sessions, 8, 8)  # batch_size 2: four micro-batches
    outcome = classify_chunk(
        sessions, holder, job_id, chunks[0], settings=settings, load_image=a_face
    )
    assert outcome.succeeded == 8 and len(outcome.forward_batches) == 4
    assert calls["cancelled"] == 0
    assert calls["heartbeat"] == [2]  # the process's first heartbeat goes out at once

    monkeypatch.setattr(chunk_classifier, "STATUS_INTERVAL_SECONDS", 0.0)
    job_id, chunks = make_job(sessions, 4, 4)
    classify_chunk(sessions, holder, job_id, chunks[0], settings=settings, load_image=a_face)
    assert calls["heartbeat"] == [2, 6 + 2, 2]  # the six skipped ones are not lost
    assert calls["cancelled"] == 1  # in the second micro-batch's write

    # A new version is reported at once, however recent the last heartbeat.
    monkeypatch.setattr(chunk_classifier, "STATUS_INTERVAL_SECONDS", 3600.0)
    monkeypatch.setattr(FakeHolder, "serving_version", property(lambda self: 2))
    job_id, chunks = make_job(sessions, 4, 4)
    classify_chunk(sessions, holder, job_id, chunks[0], settings=settings, load_image=a_face)
    assert calls["heartbeat"] == [2, 6 + 2, 2, 2]


def test_a_serving_worker_counts_the_delivery_when_the_chunk_starts(sessions, settings) -> None:
    holder = FakeHolder()
    first_job, first_chunks = make_job(sessions, 2, 2)
    classify_chunk(
        sessions, holder, first_job, first_chunks[0], settings=settings, load_image=a_face
    )
    assert holder.serving_version == 1
    job_id, chunks = make_job(sessions, 4, 4)
    outcome = classify_chunk(
        sessions, holder, job_id, chunks[0], settings=settings, load_image=a_face
    )
    assert (outcome.succeeded, outcome.attempt) == (4, 1)
    assert attempts_of(sessions, job_id) == [1, 1, 1, 1]


# --- the Celery task: bounded retries, then the images fail with the reason ---------------------


@pytest.fixture
def eager_task(monkeypatch: pytest.MonkeyPatch, sessions, settings):
    """The real task, run with ``apply()``: its helpers point at the test database."""
    import worker.tasks as tasks

    monkeypatch.setattr(tasks, "sessions", lambda: sessions)
    monkeypatch.setattr(tasks, "holder", lambda: FakeHolder())
    monkeypatch.setattr(tasks, "image_loader", lambda: disk_on_fire)
    monkeypatch.setattr(tasks, "batcher", lambda: None)
    monkeypatch.setattr(tasks, "settings", settings)
    countdowns: list[float] = []
    real_retry = tasks.classify_chunk_task.retry

    def retry(*args, **kwargs):
        countdowns.append(kwargs["countdown"])
        return real_retry(*args, **kwargs)

    monkeypatch.setattr(tasks.classify_chunk_task, "retry", retry)
    return tasks.classify_chunk_task, countdowns


def test_a_failing_chunk_is_retried_then_failed_with_its_reason(sessions, eager_task) -> None:
    task, countdowns = eager_task
    job_id, chunks = make_job(sessions, 4, 4)
    kwargs = {"job_id": str(job_id), "image_ids": chunks[0]}

    # Eagerly, each retry runs again at once (countdowns are recorded, not waited for).
    last = task.apply(kwargs=kwargs)

    assert last.state == "SUCCESS", last.traceback
    assert last.result["gave_up"] and last.result["failed"] == 4
    assert attempts_of(sessions, job_id) == [MAX] * 4
    assert len(countdowns) == MAX - 1 and all(c > 0 for c in countdowns)
    job = job_row(sessions, job_id)
    assert (job.status, job.done, job.failed) == (JobStatus.FAILED, 0, 4)
    errors = {r.error for r in results_of(sessions, job_id)}
    assert len(errors) == 1
    error = errors.pop()
    assert error.startswith(f"gave up after {MAX} deliveries; last error: RuntimeError: disk on")
    assert "hunter2" not in error, "credentials leaked into a user-visible reason"
    # A late redelivery of the given-up chunk changes nothing.
    assert task.apply(kwargs=kwargs).result["skipped"]
    assert (job_row(sessions, job_id).done, job_row(sessions, job_id).failed) == (0, 4)


def test_failure_reasons_are_short_and_secret_free() -> None:
    from worker.tasks import REASON_MAX_CHARS
    from worker.tasks import failure_reason

    exc = ValueError("cannot reach postgresql://fe:s3cret@db:5432/jobs\n[SQL: SELECT secret]")
    reason = failure_reason(exc)
    assert reason == "ValueError: cannot reach postgresql://***@db:5432/jobs"
    assert failure_reason(KeyError()) == "KeyError"
    assert len(failure_reason(RuntimeError("x" * 5000))) == REASON_MAX_CHARS


def test_retry_backoff_grows_and_is_capped() -> None:
    from worker.tasks import RETRY_BASE_SECONDS
    from worker.tasks import RETRY_MAX_SECONDS
    from worker.tasks import retry_countdown

    for attempts in range(1, 12):
        base = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (attempts - 1))
        assert 0.5 * base <= retry_countdown(attempts) <= 1.5 * base


# --- the worker's sweeper thread: which stall period applies -----------------------------------


def test_the_worker_sweeper_waits_longer_while_tasks_are_queued(tmp_path: Path, sessions) -> None:
    """With tasks waiting, a job without progress is most likely waiting its turn: copies of
    its chunks are only sent once the queue is empty, or after the visibility timeout."""
    from face_emotions.jobs.broker import BrokerClient
    from face_emotions.jobs.protocol import INFERENCE_QUEUE
    from face_emotions.jobs.schema import utcnow
    from worker.recovery import RecoverySweeper

    url = str(sessions.kw["bind"].url)
    broker = BrokerClient("memory://")
    settings = Settings(var_dir=tmp_path, database_url=url, stall_seconds=5, visibility_timeout=600)
    sweeper = RecoverySweeper(broker, settings)

    def waiting() -> int:
        with broker.connection() as connection:
            try:
                channel = connection.default_channel
                return channel.queue_declare(queue=INFERENCE_QUEUE, passive=True)[1]
            except Exception:
                return 0

    def stalled_job(seconds: float) -> uuid.UUID:
        job_id, _ = make_job(sessions, 3, 4, progressed_at=utcnow() - timedelta(seconds=seconds))
        return job_id

    try:
        first = stalled_job(60)
        report = sweeper.run_once()
        assert report is not None and report.jobs == [str(first)]
        assert waiting() == 1, "the chunk was not sent"
        # The queue is not empty now: a job stalled for a minute waits its turn...
        second = stalled_job(60)
        report = sweeper.run_once()
        assert report is not None and report.jobs == []
        # ... but not for longer than the visibility timeout.
        third = stalled_job(601)
        report = sweeper.run_once()
        assert report is not None and report.jobs == [str(third)]
        assert waiting() == 2
        assert naive(job_row(sessions, second).progressed_at) < naive(utcnow()) - timedelta(
            seconds=30
        )
    finally:
        sweeper.stop()
