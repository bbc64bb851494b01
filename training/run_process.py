"""``python -m training.run_process RUN_ID``: one training run, in a process of its own.

The trainer's task runs in a Celery pool process, which is daemonic: it may not have children,
so PyTorch's DataLoader workers (``training.num_workers``) could not start there. The task
therefore starts this module as an ordinary process in its own session, which may use every
core through DataLoader workers, leaves nothing behind when it exits (CUDA context, allocator
caches, Lightning globals), and can be stopped as a whole when an admin cancels the run.
"""

from __future__ import annotations

import logging
import sys
import uuid

from face_emotions.jobs.broker import BrokerClient
from face_emotions.jobs.database import create_db_engine
from face_emotions.jobs.database import session_factory
from face_emotions.ops.log_format import configure_logging
from face_emotions.ops.malloc_tuning import tune_glibc_malloc
from face_emotions.ops.redaction import install_log_redaction
from face_emotions.settings import get_settings

log = logging.getLogger("training.run_process")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m training.run_process RUN_ID", file=sys.stderr)
        return 2
    tune_glibc_malloc()
    settings = get_settings()
    configure_logging(settings)
    install_log_redaction(settings, ("training", "face_emotions", "lightning"))

    from training.run_record import train_and_record
    from training.train import run_training

    engine = create_db_engine(settings.resolved_database_url)
    try:
        status = train_and_record(
            uuid.UUID(args[0]),
            settings=settings,
            sessions=session_factory(engine),
            train=run_training,
            announce=BrokerClient.from_settings(settings).announce_promotion,
        )
    finally:
        engine.dispose()
    return 0 if status == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
