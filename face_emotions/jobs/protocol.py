"""What crosses the broker between the API, the inference workers, the trainer and the CLI.

Every name a process sends and another receives is declared here once: task names, queue
names, the reload broadcast, and the retry policy for publishing. The services' Celery apps
register their tasks and queues under these names, and :mod:`face_emotions.jobs.broker` sends
to them, so a name can't drift between a sender and its receiver.

Messages use Celery's task message protocol 2 (documented in Celery's "Message Protocol"
reference: ``headers`` carry the task name and id, the body is ``[args, kwargs, embed]``),
built here with nothing but the standard library so the core needs no Celery to send one.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any
from typing import Final

#: One chunk of a job: ``kwargs={"job_id": str, "image_ids": [int, ...]}``.
CLASSIFY_TASK: Final = "emotions.classify_chunk"
#: One training run: ``kwargs={"run_id": str, "dispatch": str}`` (``dispatch`` may be absent).
TRAIN_TASK: Final = "emotions.train"
#: Queue the inference workers consume (the trainer's queue is ``EMOTIONS_TRAINING_QUEUE``).
INFERENCE_QUEUE: Final = "inference"
#: Remote-control command broadcast after a promotion: workers re-check the serving alias.
RELOAD_COMMAND: Final = "emotions_reload_model"
#: Celery's default control exchange (``control_exchange``): broadcasts go to
#: ``<this>.pidbox``, the fanout exchange every worker's remote-control mailbox listens on.
CONTROL_EXCHANGE: Final = "celery"
#: How long a sender waits for the broker before it gives up.
CONNECT_TIMEOUT_SECONDS: Final = 3.0
#: Bounded publish retry: with the broker down a request must answer in seconds, and the
#: database already holds what was not sent (the recovery sweeper sends it later).
PUBLISH_RETRY: Final[dict[str, float]] = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 1,
}


@dataclass(frozen=True)
class TaskMessage:
    """One task message: what a Celery worker needs to run ``name(**kwargs)``."""

    name: str
    kwargs: dict[str, Any]
    id: str

    @classmethod
    def create(cls, name: str, **kwargs: Any) -> TaskMessage:
        return cls(name=name, kwargs=kwargs, id=str(uuid.uuid4()))

    def body(self) -> list[Any]:
        """``[args, kwargs, embed]``: no positional arguments, no callbacks, chains or chords."""
        embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        return [[], self.kwargs, embed]

    def headers(self) -> dict[str, Any]:
        kwargs_repr = json.dumps(self.kwargs, separators=(",", ":"))
        return {
            "lang": "py",
            "task": self.name,
            "id": self.id,
            "root_id": self.id,
            "parent_id": None,
            "group": None,
            "group_index": None,
            "shadow": None,
            "eta": None,
            "expires": None,
            "retries": 0,
            "timelimit": [None, None],
            "argsrepr": "()",
            "kwargsrepr": kwargs_repr if len(kwargs_repr) <= 1024 else kwargs_repr[:1021] + "...",
            "origin": f"{os.getpid()}@{socket.gethostname()}",
            "ignore_result": True,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        }


def classify_chunk_message(job_id: str, image_ids: list[int]) -> TaskMessage:
    return TaskMessage.create(CLASSIFY_TASK, job_id=str(job_id), image_ids=list(image_ids))


def train_message(run_id: str, dispatch: str | None = None) -> TaskMessage:
    """``dispatch`` names this sending of the run (see
    :func:`face_emotions.jobs.training_runs.dispatch_pending`): a trainer starts a run only for
    the message of its current dispatch, so a run sent twice is still trained once."""
    if dispatch is None:
        return TaskMessage.create(TRAIN_TASK, run_id=str(run_id))
    return TaskMessage.create(TRAIN_TASK, run_id=str(run_id), dispatch=dispatch)
