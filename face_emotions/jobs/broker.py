"""The one broker client every sender uses: the API, the workers' sweeper, the trainer, the CLI.

It speaks the names of :mod:`face_emotions.jobs.protocol` over kombu (the messaging library
under Celery), so the core can send a chunk, a training run or a reload broadcast without a
Celery app, and no sender keeps its own copy of a task name, queue or retry policy.

Every call gives up after one quick connection attempt plus the bounded publish retry: a
request or a sweep must not hang on a dead broker. What was not sent stays in the database
(a queued job, a queued run) and is sent again once the broker is back.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING
from typing import Protocol
from typing import runtime_checkable

from face_emotions.jobs.protocol import CONNECT_TIMEOUT_SECONDS
from face_emotions.jobs.protocol import CONTROL_EXCHANGE
from face_emotions.jobs.protocol import INFERENCE_QUEUE
from face_emotions.jobs.protocol import PUBLISH_RETRY
from face_emotions.jobs.protocol import RELOAD_COMMAND
from face_emotions.jobs.protocol import TaskMessage
from face_emotions.jobs.protocol import classify_chunk_message
from face_emotions.jobs.protocol import train_message
from face_emotions.ops.redaction import redact_url

if TYPE_CHECKING:
    from kombu import Connection

    from face_emotions.settings import Settings

log = logging.getLogger(__name__)


@runtime_checkable
class ChunkSender(Protocol):
    """What job submission and recovery need from the broker."""

    def send_chunk(self, job_id: str, image_ids: list[int]) -> None:
        """Send one chunk task; raise if the broker did not take it."""

    def ping(self) -> bool:
        """Whether the broker answers now (readiness)."""


@runtime_checkable
class TrainingSender(Protocol):
    """What training runs and promotion need from the broker.

    Separate from :class:`ChunkSender` so that a sender that can't train (a test's fake) still
    serves every job route; the training routes check for it.
    """

    def send_training_run(self, run_id: str, dispatch: str | None = None) -> None:
        """Send one training run to the trainer's queue; raise if not taken. ``dispatch``: the
        run's dispatch stamp, which the trainer checks (a stale copy starts nothing)."""

    def broadcast_reload(self) -> None:
        """Ask every inference worker to re-check the serving alias now; raise if not sent."""


class BrokerClient:
    """Send chunks, training runs and reload broadcasts; answer whether the broker is up.

    Connections come from kombu's producer pool (one per process, reset after a fork), so a
    gunicorn worker or a sweeper thread reuses its connection instead of dialling per message.
    """

    def __init__(
        self,
        broker_url: str,
        *,
        training_queue: str = "training",
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    ) -> None:
        from kombu import Connection

        self.broker_url = broker_url
        self.training_queue = training_queue
        self.connect_timeout = connect_timeout
        self._connection = Connection(
            broker_url,
            connect_timeout=connect_timeout,
            transport_options={"socket_connect_timeout": connect_timeout},
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> BrokerClient:
        return cls(settings.broker_url, training_queue=settings.training_queue)

    # -- sending -------------------------------------------------------------------------------

    def send_chunk(self, job_id: str, image_ids: list[int]) -> None:
        self._send(classify_chunk_message(job_id, image_ids), INFERENCE_QUEUE)

    def send_training_run(self, run_id: str, dispatch: str | None = None) -> None:
        self._send(train_message(run_id, dispatch), self.training_queue)

    def broadcast_reload(self) -> None:
        """Fire and forget: workers that miss it still see the alias at their next poll."""
        from kombu.pidbox import Mailbox

        mailbox = Mailbox(CONTROL_EXCHANGE, type="fanout", accept=["json"], serializer="json")
        with self.connection() as connection:
            mailbox(connection).abcast(RELOAD_COMMAND)
        log.info("broadcast %s", RELOAD_COMMAND)

    def announce_promotion(self) -> None:
        """:meth:`broadcast_reload` for callers that must not fail because the broker is away
        (the alias has moved already; the workers' poll is the fallback)."""
        try:
            self.broadcast_reload()
        except Exception as exc:
            log.warning(
                "could not broadcast %s (%s); workers pick the new champion up at their next "
                "poll (EMOTIONS_MODEL_REFRESH_SECONDS)",
                RELOAD_COMMAND,
                exc,
            )

    # -- connection ----------------------------------------------------------------------------

    def ping(self) -> bool:
        try:
            with self.connection():
                return True
        except Exception as exc:
            log.warning("broker %s unreachable: %s", redact_url(self.broker_url), exc)
            return False

    @contextlib.contextmanager
    def connection(self) -> Iterator[Connection]:
        """A live connection after one quick attempt, or the error (kombu would otherwise keep
        retrying a dead broker while a request waits)."""
        connection = self._connection.clone()
        try:
            connection.ensure_connection(
                max_retries=1,
                interval_start=0,
                interval_step=0.5,
                interval_max=0.5,
                timeout=self.connect_timeout,
            )
            yield connection
        finally:
            connection.release()

    def close(self) -> None:
        self._connection.release()

    def _send(self, message: TaskMessage, queue: str) -> None:
        from kombu.pools import producers

        # The anonymous exchange routes by queue name alone: the message lands in the queue's
        # list whatever bindings Redis holds. A declared exchange would be looked up through a
        # binding that kombu declares once per process and caches, so after a Redis restart
        # without persistence (or anything else that drops the binding) every message would
        # be routed nowhere, silently.
        with producers[self._connection].acquire(
            block=True, timeout=self.connect_timeout
        ) as producer:
            producer.publish(
                message.body(),
                exchange="",
                routing_key=queue,
                serializer="json",
                headers=message.headers(),
                correlation_id=message.id,
                delivery_mode=2,
                retry=True,
                retry_policy=PUBLISH_RETRY,
            )
