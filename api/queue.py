"""Dispatching chunks of a job to the inference workers, and training runs to the trainer.

The API depends on the :class:`JobQueue` and :class:`TrainingQueue` protocols, not on Celery,
so tests pass an in-memory fake and the job logic never waits on a broker.
:class:`CeleryJobQueue` is the production implementation of both: a *client-only* Celery app
that sends tasks by name, so the API process never imports the worker or trainer code (torch,
the model) just to enqueue.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from celery import Celery

from face_emotions.settings import Settings

log = logging.getLogger(__name__)

TASK_NAME = "emotions.classify_chunk"
QUEUE_NAME = "inference"
CONNECT_TIMEOUT_SECONDS = 3.0
#: Must match ``training.service.TRAIN_TASK`` and ``worker.app.RELOAD_COMMAND``.
TRAIN_TASK_NAME = "emotions.train"
RELOAD_COMMAND = "emotions_reload_model"
#: Bounded publish retry: with the broker down a request must answer in seconds.
PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


@runtime_checkable
class JobQueue(Protocol):
    def enqueue_chunk(self, job_id: str, image_ids: list[int]) -> None:
        """Send one chunk task; raise if the broker did not take it."""

    def ping(self) -> bool:
        """Whether the broker answers now (readiness)."""


@runtime_checkable
class TrainingQueue(Protocol):
    """What the training-run and promotion routes need from the broker.

    A separate protocol (not more methods on :class:`JobQueue`) so that a job queue that can't
    train, such as a test's fake, still serves every job route; those routes check for it.
    """

    def enqueue_training(self, run_id: str) -> None:
        """Send ``emotions.train`` for one run; raise if the broker did not take it."""

    def broadcast_reload(self) -> None:
        """Ask every inference worker to re-check the serving alias; raise if not sent."""


class CeleryJobQueue:
    """Send chunk tasks to queue ``inference``, training runs to the training queue, and
    reload broadcasts, all through the one broker the workers and trainers share."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = Celery("face_emotions", broker=settings.broker_url, set_as_current=False)
        self.app.conf.update(
            # Must match the workers': Redis redelivers unacked tasks after this many seconds.
            broker_transport_options={
                "visibility_timeout": settings.visibility_timeout,
                "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
            },
            broker_connection_timeout=CONNECT_TIMEOUT_SECONDS,
            task_ignore_result=True,
            task_serializer="json",
            accept_content=["json"],
        )

    def enqueue_chunk(self, job_id: str, image_ids: list[int]) -> None:
        # A bounded publish retry: with the broker down the request must answer in seconds
        # (the job is already committed and is dispatched again when the broker is back).
        self.app.send_task(
            TASK_NAME,
            kwargs={"job_id": job_id, "image_ids": list(image_ids)},
            queue=QUEUE_NAME,
            retry=True,
            retry_policy=PUBLISH_RETRY,
        )

    def enqueue_training(self, run_id: str) -> None:
        self.app.send_task(
            TRAIN_TASK_NAME,
            kwargs={"run_id": run_id},
            queue=self.settings.training_queue,
            retry=True,
            retry_policy=PUBLISH_RETRY,
        )

    def broadcast_reload(self) -> None:
        with self._connected() as connection:
            self.app.control.broadcast(RELOAD_COMMAND, connection=connection)

    def ping(self) -> bool:
        try:
            with self._connected():
                pass
            return True
        except Exception as exc:
            log.warning("broker %s unreachable: %s", _redacted(self.settings.broker_url), exc)
            return False

    @contextlib.contextmanager
    def _connected(self) -> Iterator[Any]:
        """A broker connection after one quick attempt, or the error: kombu (and broadcast())
        would otherwise keep retrying a dead broker while a request waits."""
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(
                max_retries=1,
                interval_start=0,
                interval_step=0.5,
                interval_max=0.5,
                timeout=CONNECT_TIMEOUT_SECONDS,
            )
            yield connection


def _redacted(url: str) -> str:
    """Broker URLs can embed a password; keep it out of logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
