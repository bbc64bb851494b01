"""Persistence of jobs, images and predictions (SQLAlchemy 2; PostgreSQL or SQLite)."""

from human_face_emotions.db.engine import create_db_engine, session_factory
from human_face_emotions.db.schema import Base, Image, Job, JobStatus, Result, WorkerState

__all__ = [
    "Base",
    "Image",
    "Job",
    "JobStatus",
    "Result",
    "WorkerState",
    "create_db_engine",
    "session_factory",
]
