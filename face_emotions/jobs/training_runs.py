"""The queries of training runs, shared by the API (create, read) and the trainer (progress).

Every status change is a conditional ``UPDATE`` (status only moves forward), so a task that the
broker delivers twice cannot undo or repeat a finished run: the second delivery finds nothing
to move and does nothing. The data folder check lives here too because both sides need it: the
API refuses a bad folder at submission, the trainer resolves it again under its own data root
(it may be mounted elsewhere) at run time.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from collections.abc import Sequence
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any
from typing import cast

from sqlalchemy import ColumnElement
from sqlalchemy import CursorResult
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import update
from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

from face_emotions.data.data_root import resolve_local_folder
from face_emotions.jobs.schema import TrainingRun
from face_emotions.jobs.schema import TrainingRunStatus
from face_emotions.jobs.schema import utcnow

#: Stored errors are for people; a traceback-sized message would bloat every list page.
MAX_ERROR_CHARS = 4000
_QUEUED, _RUNNING = TrainingRunStatus.QUEUED, TrainingRunStatus.RUNNING
_ACTIVE = (_QUEUED, _RUNNING)
_NOT_CANCELLED = TrainingRun.cancel_requested_at.is_(None)


def resolve_data_path(data_root: Path, folder: str) -> Path:
    """``folder`` as an existing directory inside ``data_root`` (see
    :func:`~face_emotions.data.data_root.resolve_local_folder`; raises its ``FolderError``)."""
    return resolve_local_folder(data_root, folder)[1]


def create_run(
    session: Session,
    *,
    data_path: str,
    overrides: Sequence[str],
    promote: str,
    requested_by: str,
    run_id: uuid.UUID | None = None,
) -> TrainingRun:
    """Insert a queued run (the caller commits before dispatching it)."""
    run = TrainingRun(
        id=run_id or uuid.uuid4(),
        status=TrainingRunStatus.QUEUED,
        requested_by=requested_by,
        overrides=list(overrides),
        data_path=data_path,
        promote=promote,
        promoted=False,
        attempts=0,
        created_at=utcnow(),
    )
    session.add(run)
    session.flush()
    return run


def get_run(session: Session, run_id: uuid.UUID) -> TrainingRun | None:
    return session.get(TrainingRun, run_id, populate_existing=True)


def list_runs(session: Session, *, offset: int, limit: int) -> tuple[list[TrainingRun], int]:
    """One page of runs, newest first, and the total count."""
    runs = session.scalars(
        select(TrainingRun)
        .order_by(TrainingRun.created_at.desc(), TrainingRun.id)
        .offset(offset)
        .limit(limit)
    ).all()
    total = session.scalar(select(func.count()).select_from(TrainingRun))
    return list(runs), int(total or 0)


# -- dispatch ---------------------------------------------------------------------------------


def _move_run(session: Session, run_id: uuid.UUID, *conditions: Any, **values: Any) -> bool:
    """Update run ``run_id`` where ``conditions`` hold; whether it moved (the point of a
    conditional update: of two processes racing, one moves the run and the other learns so)."""
    statement = update(TrainingRun).where(TrainingRun.id == run_id, *conditions).values(**values)
    return bool(cast(CursorResult[Any], session.execute(statement)).rowcount)


def claim_dispatch(session: Session, run_id: uuid.UUID) -> datetime | None:
    """Mark a queued, never-sent run as being sent; its dispatch stamp, or None if someone else
    sent it already.

    The conditional update is the lock: of two processes dispatching pending runs at once,
    only one sends each run, so a broker outage never turns into duplicate trainings. The stamp
    goes with the message (:func:`dispatch_token`): a trainer starts the run only for the
    message of its current stamp.
    """
    stamp = utcnow()
    queued, unsent = TrainingRun.status == _QUEUED, TrainingRun.dispatched_at.is_(None)
    return stamp if _move_run(session, run_id, queued, unsent, dispatched_at=stamp) else None


def release_dispatch(session: Session, run_id: uuid.UUID) -> None:
    """The broker refused the task: let the next dispatcher try again."""
    _move_run(session, run_id, TrainingRun.status == _QUEUED, dispatched_at=None)


def dispatch_token(stamp: datetime) -> str:
    """The text form of a dispatch stamp that travels in the task message."""
    return _as_utc(stamp).isoformat()


def is_current_dispatch(run: TrainingRun, token: str | None) -> bool:
    """Whether a delivery carrying ``token`` is the run's current sending.

    A message without a token (sent by an older release) is taken as current. One whose token
    differs from ``dispatched_at`` is a stale copy: the send that put it on the broker raised
    (a timeout after the broker took it, say), the run was sent again, and that later message
    is the one that starts it.
    """
    if token is None:
        return True
    if run.dispatched_at is None:
        return False
    try:
        sent = datetime.fromisoformat(token)
    except ValueError:
        return False
    return _as_utc(run.dispatched_at) == _as_utc(sent)


def _as_utc(moment: datetime) -> datetime:
    """SQLite hands datetimes back naive (they are UTC); PostgreSQL aware."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


#: ``send(run_id, dispatch_token)``: publish one run's task; raise if the broker refused it.
SendRun = Callable[[str, str], None]


def dispatch_pending(
    sessions: sessionmaker[Session],
    send: SendRun,
    *,
    limit: int = 100,
    created_before: datetime | None = None,
) -> tuple[list[uuid.UUID], Exception | None]:
    """Send every queued run that never reached the broker, oldest first.

    ``send`` raises when the broker refuses; dispatching stops there (the broker is down, the
    rest would fail too) and the run is released for the next attempt. Returns the runs sent
    and the error that stopped it, if any. Called after each submission, when a trainer starts
    and by the recovery sweeper (with ``created_before`` a few seconds ago, so that it does not
    take a run from the API request that is about to send it), which is how runs accepted
    during a broker outage still get trained.
    """
    conditions = [TrainingRun.status == _QUEUED, TrainingRun.dispatched_at.is_(None)]
    if created_before is not None:
        conditions.append(TrainingRun.created_at < created_before)
    with sessions() as session:
        pending = list(
            session.scalars(
                select(TrainingRun.id)
                .where(*conditions)
                .order_by(TrainingRun.created_at, TrainingRun.id)
                .limit(limit)
            )
        )
    sent: list[uuid.UUID] = []
    for run_id in pending:
        with sessions() as session:
            stamp = claim_dispatch(session, run_id)
            if stamp is None:
                session.rollback()
                continue
            session.commit()
            try:
                send(str(run_id), dispatch_token(stamp))
            except Exception as exc:
                release_dispatch(session, run_id)
                session.commit()
                return sent, exc
        sent.append(run_id)
    return sent, None


# -- progress (the trainer) -------------------------------------------------------------------


def mark_running(
    session: Session, run_id: uuid.UUID, *, dispatch: str | None = None
) -> TrainingRun | None:
    """Start (or restart) a run; ``None`` tells the task to do nothing.

    A run already ``running`` is restarted: with ``acks_late`` the broker only delivers the same
    message again when the trainer that had it died, so nobody else is working on it. A
    delivery whose ``dispatch`` token is not the run's current one is a second copy of the run
    (see :func:`is_current_dispatch`) and starts nothing, so a run sent twice is never trained
    twice at once. A finished run stays finished.
    """
    current = get_run(session, run_id)
    if current is None or not is_current_dispatch(current, dispatch):
        return None
    # A trainer that died while stopping a cancelled run: nothing to restart.
    conditions: list[ColumnElement[bool]] = [TrainingRun.status.in_(_ACTIVE), _NOT_CANCELLED]
    if dispatch is not None:  # checked again in the update: the run may be re-sent meanwhile
        conditions.append(TrainingRun.dispatched_at == current.dispatched_at)
    moved = _move_run(
        session,
        run_id,
        *conditions,
        status=TrainingRunStatus.RUNNING,
        started_at=utcnow(),
        attempts=TrainingRun.attempts + 1,
        error=None,
        progress=None,
    )
    if not moved:
        if cancel_requested(session, run_id):  # a finished run is left as it is
            mark_cancelled(session, run_id, "cancelled while its trainer was stopping")
        return None
    return get_run(session, run_id)


def mark_succeeded(
    session: Session,
    run_id: uuid.UUID,
    *,
    mlflow_run_id: str | None,
    registered_version: int | None,
    promoted: bool,
    promotion_reason: str | None,
    metrics: dict[str, Any],
) -> bool:
    """Record a finished run; False (and no change) if it had finished already."""
    return _finish(
        session,
        run_id,
        status=TrainingRunStatus.SUCCEEDED,
        mlflow_run_id=mlflow_run_id,
        registered_version=registered_version,
        promoted=promoted,
        promotion_reason=promotion_reason,
        metrics=metrics,
        error=None,
    )


def mark_failed(
    session: Session, run_id: uuid.UUID, error: str, *, mlflow_run_id: str | None = None
) -> bool:
    """Record a failed run; False (and no change) if it had finished already."""
    if len(error) > MAX_ERROR_CHARS:
        error = error[: MAX_ERROR_CHARS - 3] + "..."
    values: dict[str, Any] = {"error": error}
    if mlflow_run_id is not None:
        values["mlflow_run_id"] = mlflow_run_id
    return _finish(session, run_id, status=TrainingRunStatus.FAILED, **values)


def _finish(session: Session, run_id: uuid.UUID, *, status: TrainingRunStatus, **values) -> bool:
    active = TrainingRun.status.in_(_ACTIVE)
    return _move_run(session, run_id, active, status=status, finished_at=utcnow(), **values)


# -- progress and cancellation -----------------------------------------------------------------


def record_mlflow_run(session: Session, run_id: uuid.UUID, mlflow_run_id: str) -> None:
    """The MLflow run is known as soon as training starts: a run that fails later still links
    to what MLflow recorded of it."""
    _move_run(session, run_id, TrainingRun.status == _RUNNING, mlflow_run_id=mlflow_run_id)


def report_progress(session: Session, run_id: uuid.UUID, progress: dict[str, Any]) -> bool:
    """Store the trainer's latest report; True while the run should go on (running and not
    asked to stop), so the reporter learns of a cancel at its next report."""
    report = {**progress, "updated_at": utcnow().isoformat()}
    return _move_run(
        session, run_id, TrainingRun.status == _RUNNING, _NOT_CANCELLED, progress=report
    )


def request_cancel(session: Session, run_id: uuid.UUID) -> TrainingRunStatus | None:
    """Cancel a queued run now, or ask the trainer to stop a running one.

    Returns the run's status afterwards (``cancelled``, or ``running`` with the request set,
    or a finished status, unchanged), None for an unknown run. The trainer stops a running run
    within seconds and marks it cancelled itself, once its process is gone.
    """
    now = utcnow()
    _move_run(
        session,
        run_id,
        TrainingRun.status == _QUEUED,
        status=TrainingRunStatus.CANCELLED,
        cancel_requested_at=now,
        finished_at=now,
        error="cancelled by an admin before it started",
    )
    _move_run(
        session, run_id, TrainingRun.status == _RUNNING, _NOT_CANCELLED, cancel_requested_at=now
    )
    run = get_run(session, run_id)
    return None if run is None else TrainingRunStatus(run.status)


def cancel_requested(session: Session, run_id: uuid.UUID) -> bool:
    requested = session.scalar(
        select(TrainingRun.cancel_requested_at).where(TrainingRun.id == run_id)
    )
    return requested is not None


def mark_cancelled(session: Session, run_id: uuid.UUID, reason: str) -> bool:
    """Record a stopped run; False (and no change) if it had finished already."""
    return _finish(session, run_id, status=TrainingRunStatus.CANCELLED, error=reason)
