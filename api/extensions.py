"""Per-app services bound with ``init_app``: settings, database sessions, broker, registry.

Nothing here holds an app, an engine or a session at module level: each ``create_app`` call
builds its own and stores it in ``app.extensions``, so tests can run several apps (different
databases) in one process and gunicorn workers never share connections.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from flask import Flask
from flask import current_app
from flask import g
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

from face_emotions.jobs.broker import ChunkSender
from face_emotions.jobs.database import create_db_engine
from face_emotions.jobs.database import session_factory
from face_emotions.settings import Settings

_KEY = "face_emotions"
_SESSION = "_face_emotions_session"


@dataclass
class Services:
    """Everything a view needs, reachable with :func:`services`."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    broker: ChunkSender
    registry_factory: Callable[[], Any]
    _registry: Any = None
    _registry_lock: threading.Lock = field(default_factory=threading.Lock)

    def registry(self) -> Any:
        """The registry client, built on first use and then cached for the app's lifetime.

        Built lazily because constructing one imports MLflow and may contact its server: an
        API whose registry is down must still start, accept jobs and answer ``/readyz``. A
        failed construction is not cached, so the next request retries.
        """
        if self._registry is None:
            with self._registry_lock:
                if self._registry is None:
                    self._registry = self.registry_factory()
        return self._registry


def init_app(
    app: Flask,
    settings: Settings,
    *,
    broker: ChunkSender,
    registry_factory: Callable[[], Any],
) -> Services:
    engine = create_db_engine(settings.resolved_database_url)
    state = Services(
        settings=settings,
        engine=engine,
        sessions=session_factory(engine),
        broker=broker,
        registry_factory=registry_factory,
    )
    app.extensions[_KEY] = state
    app.teardown_appcontext(_remove_session)
    _dispose_after_fork(engine)
    return state


def services() -> Services:
    return current_app.extensions[_KEY]


def db_session() -> Session:
    """The request's session: opened on first use, closed (rolled back) at teardown."""
    session = g.get(_SESSION)
    if session is None:
        session = services().sessions()
        setattr(g, _SESSION, session)
    return session


def _remove_session(_exc: BaseException | None) -> None:
    session = g.pop(_SESSION, None)
    if session is not None:
        session.close()


def _dispose_after_fork(engine: Engine) -> None:
    """A forked child (gunicorn ``--preload``) must not reuse the parent's connections."""
    if not hasattr(os, "register_at_fork"):  # pragma: no cover - Windows
        return
    ref = weakref.ref(engine)

    def _after_fork() -> None:
        target = ref()
        if target is not None:
            target.dispose(close=False)

    os.register_at_fork(after_in_child=_after_fork)
