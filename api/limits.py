"""Admission control for job submissions: a rate limit per token and queue back-pressure.

Rate limit (``EMOTIONS_SUBMIT_RATE_LIMIT``, limits syntax such as ``10/second;120/minute``):
counted per principal with Flask-Limiter. Storage is Redis at the broker URL when that is a
``redis://`` URL, so every API process and replica shares one count per token, and in-memory
otherwise. A Redis that is unreachable at start-up, or fails later, falls back to in-memory
counting (logged): the API keeps accepting jobs, limited per process, rather than failing them.
Keys carry a prefix derived from the database URL: replicas of one deployment (one database)
share counters, while apps on other databases (other deployments, tests) on the same Redis
never see each other's counts.

What counts: every submission that gets past authentication and is not an idempotent replay.
A replay (an ``Idempotency-Key`` the token already used) creates nothing and is answered from
the database, so it is free: a client retrying after a timeout is never pushed into 429 by its
own retries. Refused submissions (validation errors) do count: they cost the server a read of
the body, which is what the limit protects.

Back-pressure (``EMOTIONS_MAX_QUEUED_IMAGES``): the backlog is the number of images of queued
and running jobs without a result. When the backlog plus the new job's images would exceed the
maximum, the job is refused with 503 ``overloaded`` and ``Retry-After`` instead of growing the
queue without bound. The check is not transactional: two submissions racing may both pass, so
the bound is soft by at most one request per API process, which is enough for its purpose.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from flask import Flask
from flask_limiter import Limiter
from flask_limiter import RateLimitExceeded
from limits import parse_many
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import ApiError
from face_emotions.jobs.schema import Job
from face_emotions.jobs.schema import JobStatus
from face_emotions.settings import Settings

log = logging.getLogger(__name__)

#: Seconds a client is told to wait when the backlog is full: workers drain a chunk in
#: seconds, so half a minute is long enough for real progress and short enough to not idle.
OVERLOAD_RETRY_AFTER = 30
REDIS_SCHEMES = ("redis://", "rediss://")
STORAGE_TIMEOUT_SECONDS = 1.0
_KEY = "face_emotions_limits"


class SubmissionLimits:
    """The app's submission limiter; :meth:`check_rate` is called by the view after it
    authenticated the caller and ruled out an idempotent replay."""

    def __init__(self, app: Flask, settings: Settings, key: Callable[[], str]) -> None:
        self.settings = settings
        try:  # a typo in the limit must stop start-up, not fail the first submission
            parse_many(settings.submit_rate_limit)
        except ValueError as exc:
            raise ValueError(
                f"EMOTIONS_SUBMIT_RATE_LIMIT={settings.submit_rate_limit!r} is not a rate limit "
                "like '120/minute' or '10/second;120/minute'"
            ) from exc
        storage_uri = _storage_uri(settings)
        options: dict[str, Any] = {}
        if storage_uri.startswith(REDIS_SCHEMES):
            options = {
                "socket_connect_timeout": STORAGE_TIMEOUT_SECONDS,
                "socket_timeout": STORAGE_TIMEOUT_SECONDS,
            }
        self.limiter = Limiter(
            key_func=key,
            storage_uri=storage_uri,
            storage_options=options,
            strategy="fixed-window",
            # Flask-Limiter's headers would put Retry-After on successful submissions too;
            # check_rate sets the headers on the 429 itself.
            headers_enabled=False,
            in_memory_fallback_enabled=True,
            key_prefix=_key_prefix(settings),
        )
        self.limiter.init_app(app)
        if storage_uri.startswith(REDIS_SCHEMES) and not _storage_alive(self.limiter):
            log.warning(
                "rate-limit storage (Redis at the broker URL) is unreachable; counting job "
                "submissions in memory, per API process, until it answers"
            )
            self.limiter._storage_dead = True  # start on the in-memory fallback
        self.storage_uri = storage_uri

        @self.limiter.limit(settings.submit_rate_limit, key_func=key, scope="submit-job")
        def submission_gate() -> None:
            """A non-view callable the limit decorates: calling it counts one submission."""

        self._gate = submission_gate

    def check_rate(self) -> None:
        """Count one submission; 429 ``rate_limited`` with ``Retry-After`` when over."""
        try:
            self._gate()
        except RateLimitExceeded as exc:
            retry_after = self._retry_after()
            raise ApiError(
                429,
                "rate_limited",
                f"too many job submissions for this token (limit {exc.description}); "
                f"retry in {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            ) from exc

    def _retry_after(self) -> int:
        """Seconds until the breached window resets (at least 1)."""
        limit = self.limiter.current_limit
        if limit is None:
            return 1
        try:
            window = int(limit.limit.get_expiry())
            return min(max(math.ceil(limit.reset_at - time.time()), 1), window)
        except Exception:  # storage trouble while computing a hint: a guess is fine
            return 1


def init_app(app: Flask, settings: Settings, key: Callable[[], str]) -> SubmissionLimits:
    limits = SubmissionLimits(app, settings, key)
    app.extensions[_KEY] = limits
    return limits


def submission_limits(app: Flask) -> SubmissionLimits:
    return app.extensions[_KEY]


def backlog(session: Session) -> int:
    """Images of queued and running jobs that have no result yet."""
    value = session.scalar(
        select(func.coalesce(func.sum(Job.total - Job.done - Job.failed), 0)).where(
            Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])
        )
    )
    return max(int(value or 0), 0)


def check_backlog(session: Session, settings: Settings, new_images: int) -> None:
    """503 ``overloaded`` with ``Retry-After`` when ``new_images`` would overfill the queue."""
    waiting = backlog(session)
    limit = settings.max_queued_images
    if waiting + new_images > limit:
        raise ApiError(
            503,
            "overloaded",
            f"the server is busy: {waiting} images are waiting and this job adds "
            f"{new_images} (at most {limit} may wait); retry later",
            headers={"Retry-After": str(OVERLOAD_RETRY_AFTER)},
        )


def _storage_uri(settings: Settings) -> str:
    url = settings.broker_url
    return url if url.startswith(REDIS_SCHEMES) else "memory://"


def _key_prefix(settings: Settings) -> str:
    """One prefix per deployment: the hash of its database URL (never the URL itself)."""
    digest = hashlib.sha256(settings.resolved_database_url.encode()).hexdigest()[:16]
    return f"face-emotions-limits-{digest}"


def _storage_alive(limiter: Limiter) -> bool:
    try:
        return bool(limiter.storage.check())
    except Exception:
        return False
