"""Shared fixtures: generated faces and an isolated MLflow store per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

from face_emotions.data.sample_faces import write_sample_dataset

# The compose stack's tests need a Docker engine and the built images: `make test-compose`
# (scripts/compose_stack/run.sh) runs them with FE_COMPOSE_STACK=1; `make test` leaves them out.
collect_ignore = [] if os.environ.get("FE_COMPOSE_STACK") else ["compose"]

#: ``moto_server``: an S3-compatible server process shared by unit and integration tests.
pytest_plugins = ["tests.s3_fixtures"]


@pytest.fixture(scope="session")
def sample_faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labelled folder with Kaggle's spelling of the surprise folder."""
    root = tmp_path_factory.mktemp("faces")
    write_sample_dataset(
        root, per_class=int(os.environ.get("TEST_FACES_PER_CLASS", 120)), seed=7, progress=False
    )
    (root / "Surprised").rename(root / "Suprise")
    return root


@pytest.fixture
def jobs_db(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """Sessions of a fresh SQLite jobs database at the newest schema (one per test)."""
    from face_emotions.jobs.database import create_db_engine
    from face_emotions.jobs.database import session_factory
    from face_emotions.jobs.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    engine = create_db_engine(url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def var_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("var")


@pytest.fixture
def isolated_env(monkeypatch: pytest.MonkeyPatch, var_dir: Path) -> Path:
    """Point every EMOTIONS_* default (MLflow store, caches) at the session's var dir."""
    from face_emotions.settings import get_settings

    monkeypatch.setenv("EMOTIONS_VAR_DIR", str(var_dir))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("EMOTIONS_MLFLOW_TRACKING_URI", raising=False)
    get_settings.cache_clear()
    yield var_dir
    get_settings.cache_clear()
