"""Engine and session construction with the settings every service needs.

Pool pre-ping drops connections the server closed (PostgreSQL restart, idle timeout) before a
request uses them; SQLite gets WAL and a busy timeout so the API and worker processes can write
the same file concurrently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

log = logging.getLogger(__name__)
T = TypeVar("T")


def create_db_engine(url: str, *, echo: bool = False, one_connection: bool = False) -> Engine:
    """``one_connection``: on SQLite, this process's threads take turns on one connection.

    SQLite lets one writer in at a time and makes the others poll with sleeps of up to 100 ms
    (its busy handler); threads of one process (a threads-pool worker) then lose more time
    sleeping than writing. Queueing them on the pool's single connection hands it over the
    moment it is free. Transactions must not nest (they don't in the worker). Other processes
    still meet the busy handler, which is what it is for.
    """
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        pool_options = (
            {"pool_size": 1, "max_overflow": 0, "pool_timeout": 120} if one_connection else {}
        )
        engine = create_engine(
            url,
            echo=echo,
            connect_args={"timeout": 30, "check_same_thread": False},
            **pool_options,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # WAL's recommended setting: commits no longer wait for an fsync each (the WAL is
            # synced at checkpoints), and the database can't be corrupted by a crash. A power
            # cut may roll back the last commits; their chunks' images then have no result
            # and the recovery sweeper sends them again.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True, pool_recycle=1800)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def with_db_retry(operation: Callable[[], T], *, attempts: int = 4, first_delay: float = 0.2) -> T:
    """Retry a whole transaction on connection loss; the caller makes it idempotent."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except (OperationalError, DBAPIError) as exc:
            if attempt == attempts or not _is_transient(exc):
                raise
            log.warning("database error (attempt %d/%d), retrying: %s", attempt, attempts, exc)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _is_transient(exc: DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True
    text = str(exc.orig).lower()
    return any(
        marker in text
        for marker in (
            "database is locked",
            "server closed the connection",
            "connection refused",
            "terminating connection",
            "could not connect",
            "connection reset",
            "deadlock detected",
            "ssl connection has been closed",
        )
    )
