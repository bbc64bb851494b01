"""Classify one chunk of a job: the work behind a queued task, free of any Celery code.

A chunk is a few micro-batches. Each micro-batch is decoded in the process's thread pool while
the previous one runs through the model, then written in one transaction, on a thread of its own
while the next one runs through the model; the first one was usually decoded during the
previous chunk's last forward pass (:mod:`~face_emotions.serving.chunk_lookahead`). Images that
already have a result
are skipped, so a redelivered chunk (worker crash, broker redelivery, sweeper) only finishes
what is missing. The model is asked for at every micro-batch: that is where a hot reload lands.

Every delivery that starts working on images counts against them (``images.attempts``), once a
model is at hand: waiting for a model is not the chunk's fault. A delivery that finds its
images already delivered ``max_chunk_attempts`` times fails them instead of trying again, so a
chunk that kills its worker every time (redelivered forever by ``reject_on_worker_lost``)
still lets its job finish.

With a :class:`~face_emotions.serving.dynamic_batcher.DynamicBatcher` the forward pass of a
micro-batch is shared with the micro-batches of other chunks running at the same time (other
jobs' included); everything else (skipping, counting, writing) stays per chunk, so sharing a
pass changes neither idempotency nor what a crash can lose.

Per micro-batch the chunk makes one database round trip, the write: cancellation is checked
in a write's transaction (off the model's thread) and the worker heartbeat written at most every
``STATUS_INTERVAL_SECONDS``, and a worker that already serves a model counts the delivery in
the transaction that starts the chunk. That matters for small jobs, where each round trip costs
about as much as the forward pass.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field
from functools import partial

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

from face_emotions.faces.detection import Face
from face_emotions.faces.detection import FaceDetector
from face_emotions.jobs.database import with_db_retry
from face_emotions.jobs.recovery import fail_chunk
from face_emotions.jobs.recovery import gave_up_reason
from face_emotions.jobs.result_writes import ResultRow
from face_emotions.jobs.result_writes import count_delivery
from face_emotions.jobs.result_writes import next_undelivered_images
from face_emotions.jobs.result_writes import pending_attempts
from face_emotions.jobs.result_writes import pending_images
from face_emotions.jobs.result_writes import record_results
from face_emotions.jobs.result_writes import start_chunk
from face_emotions.jobs.schema import TERMINAL_STATUSES
from face_emotions.jobs.schema import Job
from face_emotions.jobs.schema import JobStatus
from face_emotions.jobs.worker_heartbeats import BUSY
from face_emotions.jobs.worker_heartbeats import touch_worker
from face_emotions.ops import inference_metrics as metrics
from face_emotions.registry.mlflow_registry import RegistryError
from face_emotions.serving.chunk_lookahead import LOOKAHEAD
from face_emotions.serving.decode_ahead import DecodedBatch
from face_emotions.serving.decode_ahead import DecodePool
from face_emotions.serving.decode_ahead import PendingBatch
from face_emotions.serving.decode_ahead import iter_decoded_batches
from face_emotions.serving.dynamic_batcher import DynamicBatcher
from face_emotions.serving.face_regions import classify_regions
from face_emotions.serving.image_loading import ImageLoader
from face_emotions.serving.image_loading import storage_image_loader
from face_emotions.serving.model_holder import ModelHolder
from face_emotions.serving.model_holder import ModelUnavailable
from face_emotions.serving.model_holder import ServingModel
from face_emotions.settings import Settings

log = logging.getLogger(__name__)
#: Cancellation checks and heartbeats within a chunk are at least this far apart.
STATUS_INTERVAL_SECONDS = 1.0


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class ChunkOutcome:
    job_id: str
    skipped: str | None = None
    succeeded: int = 0
    failed: int = 0
    already_done: int = 0
    forward_batches: list[int] = field(default_factory=list)
    model_versions: set[int] = field(default_factory=set)
    seconds: float = 0.0
    attempt: int = 0  # which delivery of these images this was (0: none was counted)

    def as_dict(self) -> dict:
        return {
            "job_id": self.job_id,
            "skipped": self.skipped,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "already_done": self.already_done,
            "forward_batches": self.forward_batches,
            "model_versions": sorted(self.model_versions),
            "seconds": round(self.seconds, 3),
            "attempt": self.attempt,
        }


def classify_chunk(
    sessions: sessionmaker[Session],
    holder: ModelHolder,
    job_id: uuid.UUID,
    image_ids: Sequence[int],
    *,
    settings: Settings,
    worker_name: str | None = None,
    load_image: ImageLoader | None = None,
    batcher: DynamicBatcher | None = None,
    detector: FaceDetector | Callable[[], FaceDetector] | None = None,
) -> ChunkOutcome:
    """Classify the images of ``image_ids`` that have no result yet.

    ``load_image`` defaults to reading from storage as ``settings`` say
    (:func:`~face_emotions.serving.image_loading.storage_image_loader`); workers pass their
    per-process one. ``batcher`` shares forward passes with concurrent chunks. ``detector``
    (or a function that makes it, called only for a job that detects) finds the faces of each
    micro-batch ahead of its forward pass; jobs with face policy ``none`` skip it, and without
    a detector every image is classified whole.

    Raises :class:`ModelUnavailable` when no model can be served at all (the task retries
    later and no image is marked failed for it, and the delivery is not counted).
    """
    with LOOKAHEAD.chunk() as alone:
        return _classify_chunk(
            sessions,
            holder,
            job_id,
            image_ids,
            settings=settings,
            worker_name=worker_name or default_worker_name(),
            load_image=load_image,
            batcher=batcher,
            detector=detector,
            # Chunks sharing the process (--pool threads) decode on threads of their own, as
            # many as one chunk alone gets.
            pool=_decode_pool(settings.decode_threads) if alone else None,
        )


def _classify_chunk(
    sessions: sessionmaker[Session],
    holder: ModelHolder,
    job_id: uuid.UUID,
    image_ids: Sequence[int],
    *,
    settings: Settings,
    worker_name: str,
    load_image: ImageLoader | None,
    batcher: DynamicBatcher | None,
    detector: FaceDetector | Callable[[], FaceDetector] | None,
    pool: DecodePool | None,
) -> ChunkOutcome:
    started = time.perf_counter()
    outcome = ChunkOutcome(str(job_id))

    # A worker already serving its champion counts the delivery in the same transaction
    # that starts the chunk: one round trip less per task, which small jobs feel.
    count_at_once = holder.serving_version is not None

    def begin() -> tuple[Job | None, list[tuple[int, str, int]], bool, int | None]:
        with sessions() as session:
            job = start_chunk(session, job_id)
            if job is None:
                session.commit()
                return None, [], False, None
            images = pending_images(session, job_id, image_ids)
            pending = [(image.id, image.location, image.attempts or 0) for image in images]
            counted = (
                count_at_once
                and job.model_version is None
                and bool(pending)
                and max(attempts for _, _, attempts in pending) < settings.max_chunk_attempts
            )
            if counted:
                count_delivery(session, job_id, [image_id for image_id, _, _ in pending])
            session.commit()
            return job, pending, counted, images[0].chunk if images else None

    job, pending, counted, chunk_number = with_db_retry(begin)
    if job is None:
        outcome.skipped = "job is cancelled, finished or gone"
        return outcome
    outcome.already_done = len(image_ids) - len(pending)
    if not pending:
        outcome.skipped = "every image already has a result"
        return outcome
    ids = [image_id for image_id, _, _ in pending]
    locations = [location for _, location, _ in pending]
    delivered = max(attempts for _, _, attempts in pending)
    if not counted and delivered >= settings.max_chunk_attempts:
        outcome.failed = fail_chunk(
            sessions, job_id, ids, gave_up_reason(delivered), worker=worker_name
        )
        outcome.skipped = f"gave up after {delivered} deliveries"
        return outcome

    # Fail fast before decoding anything if there is no model at all.
    model = _model_for(holder, job.model_version)

    def count() -> None:
        with sessions() as session:
            count_delivery(session, job_id, ids)
            session.commit()

    # Retrying may count one delivery twice if a commit's answer was lost: harmless, it only
    # brings the give-up one delivery closer for a chunk whose connection is that unstable.
    if not counted:
        with_db_retry(count)
    outcome.attempt = delivered + 1
    loader = load_image or storage_image_loader(settings)
    detect_many = _detector(detector, job.face_policy)
    size = job.batch_size
    database = id(sessions)
    batches = iter_decoded_batches(
        locations,
        size,
        workers=settings.decode_threads,
        max_pixels=settings.max_image_pixels,
        loader=loader,
        keys=ids,
        detect_many=detect_many,
        pool=pool,
        first=LOOKAHEAD.take(database, job_id, job.face_policy, ids[:size], locations[:size]),
    )
    last = math.ceil(len(ids) / size) - 1
    # The job's last chunk, and a one-chunk job's only one, have nothing to guess.
    guess_after = (
        chunk_number if chunk_number is not None and chunk_number < job.chunks - 1 else None
    )

    def guess_next_chunk(after: int) -> PendingBatch | None:
        """The job's likely next chunk's first micro-batch, submitted for decoding."""
        with sessions() as session:
            found = [
                (image.id, image.location)
                for image in next_undelivered_images(session, job_id, after, size)
            ]
        if not found:
            return None
        # The process's pool, which outlives this chunk (its own may not).
        return _decode_pool(settings.decode_threads).submit(
            [location for _, location in found],
            [image_id for image_id, _ in found],
            max_pixels=settings.max_image_pixels,
            loader=loader,
            detect_many=detect_many,
        )

    def account(written: tuple[int, int], version: int | None, decode_seconds: float) -> None:
        done, failed = written
        outcome.succeeded += done
        outcome.failed += failed
        metrics.count_images(processed=done, failed=failed, model_version=version)
        metrics.observe_decode(decode_seconds)
        due = _HEARTBEATS.add((id(sessions), worker_name), done + failed, holder.serving_version)
        if due is not None:
            _heartbeat(sessions, holder, worker_name, due)

    # ``begin`` has just seen the job running: the first micro-batch needs no check.
    status_checked = time.monotonic()
    with _ResultWriter(sessions, job_id, worker_name, account) as writer:
        for index, batch in enumerate(batches):
            # Checked by an earlier write, in its transaction (on the writer thread).
            if writer.job_ended():
                outcome.skipped = "job was cancelled"
                break
            if index == last and guess_after is not None:
                # Its decoding and face detection run beside this last forward pass.
                LOOKAHEAD.start(
                    database, job_id, job.face_policy, partial(guess_next_chunk, guess_after)
                )
            if isinstance(model, str):
                rows = [ResultRow(i, error=model) for i in batch.keys]
                version = None
                forward_batch = 0
            else:
                rows, version, forward_batch = _predict(
                    holder, batcher, job.model_version, batch, job.face_policy
                )
                if batch.images:
                    outcome.forward_batches.append(forward_batch)
                    # None: the pinned version vanished mid-chunk and nothing was predicted.
                    if version is not None:
                        outcome.model_versions.add(version)
            rows += [ResultRow(i, error=reason) for i, reason in batch.errors]
            now = time.monotonic()
            check = index > 0 and now - status_checked >= STATUS_INTERVAL_SECONDS
            if check:
                status_checked = now
            writer.write(rows, version, forward_batch, batch.decode_seconds, check_status=check)
    outcome.seconds = time.perf_counter() - started
    return outcome


class _ResultWriter:
    """Writes each micro-batch's results on a thread of its own while the next micro-batch
    runs through the model: at most one write in flight, waited for before the next starts.

    Written in the forward pass's shadow, the transaction no longer stops the cores (on a
    2-core worker the main thread spent about 4.5 % of a chunk writing, with the model idle).
    Each micro-batch is still its own transaction, in order, so what a crash can lose is
    unchanged: the micro-batch being written, which has no result and is done again. Leaving
    the block waits for the last write, also when the chunk fails, so that nothing else (the
    task's failure handling) writes the same images at the same time.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        job_id: uuid.UUID,
        worker_name: str,
        account: Callable[[tuple[int, int], int | None, float], None],
    ) -> None:
        self._sessions = sessions
        self._job_id = job_id
        self._worker_name = worker_name
        self._account = account
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="result-writer")
        self._in_flight: tuple[Future[tuple[int, int, bool]], int | None, float] | None = None
        self._job_ended = False

    def __enter__(self) -> _ResultWriter:
        return self

    def write(
        self,
        rows: list[ResultRow],
        version: int | None,
        forward_batch: int,
        decode: float,
        *,
        check_status: bool = False,
    ) -> None:
        """Wait for the previous write (its counts are accounted), then start this one;
        ``check_status`` also reads, in its transaction, whether the job has ended."""
        self._finish()
        future = self._pool.submit(
            _write,
            self._sessions,
            self._job_id,
            rows,
            version,
            self._worker_name,
            forward_batch,
            check_status,
        )
        self._in_flight = (future, version, decode)

    def job_ended(self) -> bool:
        """Whether a write that checked saw the job cancelled, finished or gone. Does not
        wait: a write still in flight answers at a later micro-batch."""
        if self._in_flight is not None and self._in_flight[0].done():
            self._finish()
        return self._job_ended

    def _finish(self) -> None:
        if self._in_flight is None:
            return
        future, version, decode = self._in_flight
        self._in_flight = None
        done, failed, ended = future.result()
        self._job_ended = self._job_ended or ended
        self._account((done, failed), version, decode)

    def __exit__(self, exc_type: object, exc: BaseException | None, _tb: object) -> None:
        try:
            if exc is None:
                self._finish()
            elif self._in_flight is not None:
                failed_write = self._in_flight[0].exception()  # waits for it
                if failed_write is not None:
                    log.warning("job %s: the last write failed too: %s", self._job_id, failed_write)
        finally:
            self._pool.shutdown(wait=True)


class _HeartbeatThrottle:
    """Process-wide: a worker's first heartbeat goes out at once, later ones at most every
    ``STATUS_INTERVAL_SECONDS`` — or at once when the version it serves changed — carrying
    the images processed in between.

    Per process rather than per chunk, so that a stream of one-image tasks does not pay a
    database round trip each. What a worker serves is never stale (the models page shows
    it); only the image count of its last second before going idle waits for its next task.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: dict[tuple[int, str], tuple[float, int, int | None]] = {}

    def add(self, key: tuple[int, str], processed: int, version: int | None) -> int | None:
        """Record ``processed`` images; the count to report now, or ``None`` if not due."""
        now = time.monotonic()
        with self._lock:
            sent, unreported, reported_version = self._state.get(key, (-math.inf, 0, None))
            unreported += processed
            if now - sent < STATUS_INTERVAL_SECONDS and version == reported_version:
                self._state[key] = (sent, unreported, reported_version)
                return None
            self._state[key] = (now, 0, version)
            return unreported


_HEARTBEATS = _HeartbeatThrottle()


def _predict(
    holder: ModelHolder,
    batcher: DynamicBatcher | None,
    pinned: int | None,
    batch: DecodedBatch,
    policy: str,
) -> tuple[list[ResultRow], int | None, int]:
    """Rows of the decoded images, the model version and the regions in the forward pass.

    Faces are cropped as the serving version was trained (its ``crop`` spec) and every region
    of the micro-batch goes through one forward pass. The model is asked for at every
    micro-batch (directly, or by the batcher for every shared pass): that is where a hot
    reload lands.
    """
    model = _model_for(holder, pinned)
    if isinstance(model, str):  # the pinned version vanished since the chunk began
        return [ResultRow(i, error=model) for i in batch.keys], None, 0
    spec = model.predictor.spec.crop
    served: dict[str, int] = {"version": model.version, "forward_batch": 0}

    def predict(crops: list[PILImage.Image]) -> np.ndarray | Sequence[Sequence[float]]:
        if batcher is not None:
            shared = batcher.predict(crops, pinned)
            served.update(version=shared.version, forward_batch=shared.forward_batch)
            return shared.probabilities
        started = time.perf_counter()
        probabilities = model.predictor.predict_images(crops)
        served["forward_batch"] = len(crops)
        metrics.observe_forward(time.perf_counter() - started, len(crops))
        return probabilities

    if not batch.images:
        return [], model.version, 0
    classified = classify_regions(
        batch.images, batch.faces, policy=policy, spec=spec, predict=predict
    )
    rows = [
        ResultRow(
            i,
            probabilities=c.probabilities,
            faces=c.faces,
            faces_found=c.faces_found,
            image_size=c.size,
        )
        for i, c in zip(batch.keys, classified, strict=True)
    ]
    return rows, served["version"], served["forward_batch"]


_POOLS: dict[tuple[int, int], DecodePool] = {}
_POOLS_LOCK = threading.Lock()


def _decode_pool(workers: int) -> DecodePool:
    """This process's decode threads, kept from chunk to chunk (keyed by the process id too:
    threads do not survive a fork)."""
    key = (os.getpid(), workers)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = DecodePool(workers)
        return pool


def _detector(
    detector: FaceDetector | Callable[[], FaceDetector] | None, policy: str
) -> Callable[[list[PILImage.Image]], list[list[Face]]] | None:
    if detector is None or policy == "none":
        return None
    made = detector if isinstance(detector, FaceDetector) else detector()
    return made.detect_many


def chunk_attempts(
    sessions: sessionmaker[Session], job_id: uuid.UUID, image_ids: Sequence[int]
) -> int | None:
    """How many deliveries the chunk's images without a result have had; ``None`` when each
    of them has a result by now."""

    def read() -> int | None:
        with sessions() as session:
            return pending_attempts(session, job_id, image_ids)

    return with_db_retry(read)


def _model_for(holder: ModelHolder, pinned: int | None) -> ServingModel | str:
    """The model, or for a pinned version that does not exist the per-image error text."""
    try:
        return holder.for_job(pinned)
    except RegistryError as exc:
        if pinned is None:
            raise ModelUnavailable(str(exc)) from exc
        return f"model version {pinned} is not available: {exc}"


def _job_ended(session: Session, job_id: uuid.UUID) -> bool:
    """Cancelled, finished or gone: the chunk stops at its next micro-batch."""
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    return status is None or JobStatus(status) in TERMINAL_STATUSES


def _write(
    sessions: sessionmaker[Session],
    job_id: uuid.UUID,
    rows: list[ResultRow],
    version: int | None,
    worker_name: str,
    forward_batch: int,
    check_status: bool = False,
) -> tuple[int, int, bool]:
    """One micro-batch's transaction: (newly succeeded, newly failed, job ended)."""

    def write() -> tuple[int, int, bool]:
        with sessions() as session:
            done, failed = record_results(
                session,
                job_id,
                rows,
                model_version=version,
                worker=worker_name,
                forward_batch=forward_batch or None,
            )
            ended = check_status and _job_ended(session, job_id)
            session.commit()
            return done, failed, ended

    # Retrying the whole transaction is safe: results already written are not written twice.
    return with_db_retry(write)


def _heartbeat(
    sessions: sessionmaker[Session], holder: ModelHolder, worker_name: str, processed: int
) -> None:
    described = holder.describe()
    metrics.set_model_version(worker_name, described["version"])
    metrics.set_serving_backend(worker_name, described["version"], described["backend"])
    try:
        with sessions() as session:
            touch_worker(
                session,
                worker_name,
                model_version=described["version"],
                device=described["device"],
                backend=described["backend"],
                processed=processed,
                state=BUSY,
            )
            session.commit()
    except Exception as exc:
        log.warning("worker heartbeat failed: %s", exc)
