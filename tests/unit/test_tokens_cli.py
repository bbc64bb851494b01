"""``face-emotions tokens create|list|revoke`` against a temporary SQLite database, and the
tokens it prints authenticating against the API."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from click.testing import Result
from sqlalchemy import create_engine
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import create_app
from face_emotions.cli.main import main
from face_emotions.jobs.schema import ApiToken
from face_emotions.settings import Settings
from face_emotions.settings import get_settings
from tests.unit.test_api import FakeQueue


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'tokens.db'}"
    monkeypatch.setenv("EMOTIONS_DATABASE_URL", url)
    monkeypatch.setenv("EMOTIONS_VAR_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def rows(url: str) -> list[ApiToken]:
    engine = create_engine(url)
    try:
        with Session(engine) as session:
            return list(session.scalars(select(ApiToken).order_by(ApiToken.created_at)))
    finally:
        engine.dispose()


def test_create_prints_the_token_once_and_stores_its_hash(database: str) -> None:
    result = run("tokens", "create", "--role", "submit", "--name", "alice laptop")
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert token.startswith("fe_") and "\n" not in token
    [row] = rows(database)
    assert row.role == "submit" and row.name == "alice laptop"
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert row.id in result.stderr and "submit" in result.stderr
    assert token not in result.stderr  # stdout only: `TOKEN=$(face-emotions tokens create ...)`

    listing = run("tokens", "list")
    assert listing.exit_code == 0
    assert row.id in listing.stdout and "alice laptop" in listing.stdout
    assert row.prefix in listing.stdout and token not in listing.output


def test_role_is_required_and_checked(database: str) -> None:
    assert run("tokens", "create").exit_code == 2
    result = run("tokens", "create", "--role", "root")
    assert result.exit_code == 2 and "root" in result.output
    assert run("tokens", "create", "--role", "admin", "--name", "x" * 101).exit_code == 2


def test_revoke_and_list(database: str) -> None:
    keep = run("tokens", "create", "--role", "admin").stdout.strip()
    run("tokens", "create", "--role", "submit", "--name", "old")
    old, kept = sorted(rows(database), key=lambda r: r.name != "old")
    assert kept.token_hash == hashlib.sha256(keep.encode()).hexdigest()

    result = run("tokens", "revoke", old.id)
    assert result.exit_code == 0, result.output
    assert "revoked" in result.stderr
    again = run("tokens", "revoke", old.id)
    assert again.exit_code == 0 and "already revoked" in again.stderr
    missing = run("tokens", "revoke", "nope")
    assert missing.exit_code == 2 and "no token" in missing.output

    everything = run("tokens", "list").stdout
    active = run("tokens", "list", "--active").stdout
    assert old.id in everything and old.id not in active and kept.id in active


def test_empty_list_says_how_to_create(database: str) -> None:
    result = run("tokens", "list")
    assert result.exit_code == 0 and "tokens create" in result.stderr


def test_without_migrations_allowed_it_asks_for_db_upgrade(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMOTIONS_MIGRATE_ON_START", "false")
    get_settings.cache_clear()
    result = run("tokens", "list")
    assert result.exit_code == 2 and "face-emotions db upgrade" in result.output
    assert run("db", "upgrade").exit_code == 0
    assert run("tokens", "list").exit_code == 0


def test_created_tokens_authenticate_against_the_api(database: str, tmp_path: Path) -> None:
    submit_token = run("tokens", "create", "--role", "submit").stdout.strip()
    admin_token = run("tokens", "create", "--role", "admin").stdout.strip()
    settings = Settings(database_url=database, var_dir=tmp_path / "var", broker_url="memory://")
    client = create_app(settings, broker=FakeQueue(), registry_factory=lambda: None).test_client()

    def status(url: str, token: str) -> int:
        return client.get(url, headers={"Authorization": f"Bearer {token}"}).status_code

    assert status("/api/v1/jobs", submit_token) == 200
    assert status("/api/v1/training-runs", submit_token) == 403
    assert status("/api/v1/training-runs", admin_token) == 200

    [submit_row] = [row for row in rows(database) if row.role == "submit"]
    assert run("tokens", "revoke", submit_row.id).exit_code == 0
    assert status("/api/v1/jobs", submit_token) == 401
    assert status("/api/v1/jobs", admin_token) == 200


@pytest.mark.parametrize(
    ("status", "headers", "hint"),
    [
        (401, {}, "EMOTIONS_API_TOKEN"),
        (403, {}, "admin token"),
        (429, {"Retry-After": "17"}, "retry after 17 s"),
        (503, {"Retry-After": "30"}, "retry after 30 s"),
    ],
)
def test_client_errors_say_what_to_do(
    monkeypatch: pytest.MonkeyPatch, status: int, headers: dict[str, str], hint: str
) -> None:
    import json

    import requests

    from face_emotions.cli.api_client import ApiClientError
    from face_emotions.cli.api_client import EmotionsClient

    def fake_request(method: str, url: str, **kwargs: object) -> requests.Response:
        response = requests.Response()
        response.status_code = status
        response.headers.update({"Content-Type": "application/json", **headers})
        response._content = json.dumps({"error": {"code": "x", "message": "refused"}}).encode()
        return response

    client = EmotionsClient("http://api.invalid", "fe_secret")
    monkeypatch.setattr(client.http, "request", fake_request)
    with pytest.raises(ApiClientError) as caught:
        client.job("00000000-0000-0000-0000-000000000001")
    assert hint in str(caught.value) and "fe_secret" not in str(caught.value)
    assert caught.value.user_error is (status < 500)
