"""Authentication and authorisation of the REST API: tokens, roles, owners, the disabled mode,
security headers and secret hygiene (temporary SQLite, fake queue and registry)."""

from __future__ import annotations

import hashlib
import io
import logging
import re
import uuid
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy import update

from api import create_app
from api.auth import DISABLED_WARNING
from api.auth import required_role
from api.extensions import services
from api.security import REDACTED_LOGGERS
from face_emotions.jobs import tokens as db_tokens
from face_emotions.jobs.schema import ApiToken
from face_emotions.jobs.schema import Job
from face_emotions.ops.redaction import install_log_redaction
from face_emotions.ops.redaction import redact
from face_emotions.ops.redaction import redact_url
from face_emotions.settings import Settings
from tests.unit.test_api import FakeQueue
from tests.unit.test_api import FakeRegistry
from tests.unit.test_api import png
from tests.unit.test_api import version

BOOTSTRAP = "bootstrap-admin-token-for-tests"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    (tmp_path / "data" / "faces").mkdir(parents=True)
    return Settings(
        var_dir=tmp_path / "var",
        data_root=tmp_path / "data",
        admin_token=BOOTSTRAP,
        broker_url="memory://",
        batch_size=2,
        chunk_batches=1,
    )


@pytest.fixture
def app(settings: Settings) -> Flask:
    registry = FakeRegistry([version(1, ("champion",))])
    return create_app(settings, broker=FakeQueue(), registry_factory=lambda: registry)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def make_token(app: Flask, role: str, name: str = "") -> tuple[str, str]:
    """(plaintext, id) of a new database token."""
    with app.app_context(), services().sessions() as session:
        created = db_tokens.create_token(session, role=role, name=name)
        session.commit()
        return created.token, created.record.id


@pytest.fixture
def tokens(app: Flask) -> dict[str, tuple[str, str]]:
    return {
        "alice": make_token(app, "submit", "alice"),
        "bob": make_token(app, "submit", "bob"),
        "root": make_token(app, "admin", "root"),
    }


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def submit(client: FlaskClient, token: str | None, names=("a.png",), **headers: str):
    data: dict[str, Any] = {"files": [(io.BytesIO(png()), name) for name in names]}
    all_headers = {**(bearer(token) if token else {}), **headers}
    return client.post(
        "/api/v1/jobs", data=data, content_type="multipart/form-data", headers=all_headers
    )


def assert_error(response, status: int, code: str) -> dict[str, str]:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code, body
    return body["error"]


def rule_url(rule: str) -> str:
    """A concrete URL for a rule: a random UUID or a number for each variable part."""

    def fill(match: re.Match[str]) -> str:
        return "7" if match.group(1) == "int" else str(uuid.uuid4())

    return re.sub(r"<(?:([^:<>]+):)?[^<>]+>", fill, rule)


# -- 401: who are you? ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer fe_garbage"},
        {"Authorization": "Bearer " + "fe_" + "A" * 43},
        {"Authorization": f"Basic {BOOTSTRAP}"},
        {"Authorization": f"Bearer {BOOTSTRAP}x"},
        {"Authorization": "Token abc"},
    ],
    ids=["none", "empty", "no-value", "garbage", "unknown", "basic", "near-miss", "scheme"],
)
def test_missing_or_garbage_token_is_401(client: FlaskClient, headers: dict[str, str]) -> None:
    response = client.get("/api/v1/jobs", headers=headers)
    error = assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    value = headers.get("Authorization", "").partition(" ")[2]
    if value:
        assert value not in response.get_data(as_text=True)
    assert BOOTSTRAP not in error["message"]


def test_revoked_token_is_401_from_the_next_request(
    app: Flask, client: FlaskClient, tokens
) -> None:
    token, token_id = tokens["alice"]
    assert client.get("/api/v1/jobs", headers=bearer(token)).status_code == 200
    with app.app_context(), services().sessions() as session:
        assert db_tokens.revoke_token(session, token_id) is not None
        session.commit()
    response = client.get("/api/v1/jobs", headers=bearer(token))
    assert_error(response, 401, "unauthorized")
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


def test_every_api_route_needs_a_token(app: Flask, client: FlaskClient) -> None:
    """Found from the URL map, so a route added later without require_role fails here."""
    checked = 0
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/"):
            continue
        view = app.view_functions[rule.endpoint]
        assert required_role(view) in {"submit", "admin"}, rule.rule
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            response = client.open(rule_url(rule.rule), method=method, json={})
            assert_error(response, 401, "unauthorized")
            checked += 1
    # 13, the training run's cancel (DELETE), model import (POST) and a version's artifact
    assert checked == 16


@pytest.mark.parametrize("url", ["/healthz", "/readyz", "/openapi.json", "/docs"])
def test_probes_and_docs_are_public(client: FlaskClient, url: str) -> None:
    assert client.get(url).status_code == 200


# -- 403: wrong role --------------------------------------------------------------------------

ADMIN_ROUTES = [
    ("post", "/api/v1/training-runs", {"data": "faces"}),
    ("get", "/api/v1/training-runs", None),
    ("get", f"/api/v1/training-runs/{uuid.UUID(int=1)}", None),
    ("post", "/api/v1/models/1/promote", None),
]


@pytest.mark.parametrize(("method", "url", "body"), ADMIN_ROUTES)
def test_submit_token_on_admin_routes_is_403(
    client: FlaskClient, tokens, method: str, url: str, body
) -> None:
    token, _ = tokens["alice"]
    response = getattr(client, method)(url, json=body, headers=bearer(token))
    error = assert_error(response, 403, "forbidden")
    assert "admin" in error["message"]
    admin, _ = tokens["root"]
    allowed = getattr(client, method)(url, json=body, headers=bearer(admin))
    assert allowed.status_code not in {401, 403}, allowed.get_json()


def test_submit_token_reads_models(client: FlaskClient, tokens) -> None:
    response = client.get("/api/v1/models", headers=bearer(tokens["alice"][0]))
    assert response.status_code == 200
    assert response.get_json()["champion"] == 1


# -- owners -----------------------------------------------------------------------------------


def test_another_tokens_job_is_404(client: FlaskClient, tokens) -> None:
    alice, bob, root = (tokens[name][0] for name in ("alice", "bob", "root"))
    job_id = submit(client, alice).get_json()["id"]
    for path in ("", "/results", "/summary", "/results?format=csv"):
        url = f"/api/v1/jobs/{job_id}{path}"
        assert_error(client.get(url, headers=bearer(bob)), 404, "not_found")
        assert client.get(url, headers=bearer(alice)).status_code == 200
        assert client.get(url, headers=bearer(root)).status_code == 200
        assert client.get(url, headers=bearer(BOOTSTRAP)).status_code == 200
    assert_error(client.delete(f"/api/v1/jobs/{job_id}", headers=bearer(bob)), 404, "not_found")
    cancelled = client.delete(f"/api/v1/jobs/{job_id}", headers=bearer(alice))
    assert cancelled.get_json()["status"] == "cancelled"


def test_admin_cancels_any_job(client: FlaskClient, tokens) -> None:
    job_id = submit(client, tokens["alice"][0]).get_json()["id"]
    response = client.delete(f"/api/v1/jobs/{job_id}", headers=bearer(tokens["root"][0]))
    assert response.get_json()["status"] == "cancelled"


def test_lists_show_own_jobs_to_submit_tokens_and_all_to_admins(
    app: Flask, client: FlaskClient, tokens
) -> None:
    alice, bob, root = (tokens[name] for name in ("alice", "bob", "root"))
    mine = {submit(client, alice[0]).get_json()["id"] for _ in range(2)}
    theirs = {submit(client, bob[0]).get_json()["id"]}
    bootstrap = {submit(client, BOOTSTRAP).get_json()["id"]}

    def listed(token: str) -> tuple[set[str], int]:
        body = client.get("/api/v1/jobs", headers=bearer(token)).get_json()
        return {item["id"] for item in body["items"]}, body["total"]

    assert listed(alice[0]) == (mine, 2)
    assert listed(bob[0]) == (theirs, 1)
    assert listed(root[0]) == (mine | theirs | bootstrap, 4)
    assert listed(BOOTSTRAP) == (mine | theirs | bootstrap, 4)
    with app.app_context(), services().sessions() as session:
        owners = {str(job.id): job.owner for job in session.scalars(select(Job))}
    assert {owners[j] for j in mine} == {alice[1]}
    assert {owners[j] for j in bootstrap} == {"admin"}


def test_idempotency_keys_belong_to_their_token(client: FlaskClient, tokens) -> None:
    alice, bob = tokens["alice"][0], tokens["bob"][0]
    first = submit(client, alice, **{"Idempotency-Key": "same"})
    replay = submit(client, alice, **{"Idempotency-Key": "same"})
    other = submit(client, bob, **{"Idempotency-Key": "same"})
    assert (first.status_code, replay.status_code, other.status_code) == (202, 200, 202)
    assert replay.get_json()["id"] == first.get_json()["id"]
    assert other.get_json()["id"] != first.get_json()["id"]


def test_training_runs_record_which_token_asked(settings: Settings) -> None:
    from tests.unit.test_training_runs_api import FakeQueue as TrainingFakeQueue

    app = create_app(settings, broker=TrainingFakeQueue(), registry_factory=lambda: None)
    token, token_id = make_token(app, "admin", "trainer-bot")
    client = app.test_client()
    response = client.post(
        "/api/v1/training-runs", json={"data": "faces", "promote": "never"}, headers=bearer(token)
    )
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["requested_by"] == token_id
    by_bootstrap = client.post(
        "/api/v1/training-runs", json={"data": "faces"}, headers=bearer(BOOTSTRAP)
    )
    assert by_bootstrap.get_json()["requested_by"] == "admin"


# -- EMOTIONS_AUTH=disabled -------------------------------------------------------------------


def test_disabled_auth_lets_everyone_in_and_warns_loudly(
    settings: Settings, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    open_settings = settings.model_copy(update={"auth": "disabled", "admin_token": None})
    with caplog.at_level(logging.WARNING, logger="api.auth"):
        app = create_app(
            open_settings, broker=FakeQueue(), registry_factory=lambda: FakeRegistry([])
        )
    assert "AUTHENTICATION IS DISABLED" in caplog.text
    assert "Anyone who can reach this port" in caplog.text
    assert DISABLED_WARNING in capsys.readouterr().err

    client = app.test_client()
    job = submit(client, None)
    assert job.status_code == 202
    assert client.get(f"/api/v1/jobs/{job.get_json()['id']}").status_code == 200
    assert client.get("/api/v1/training-runs").status_code == 200
    assert client.get("/api/v1/jobs", headers=bearer("anything")).status_code == 200
    with app.app_context(), services().sessions() as session:
        assert [j.owner for j in session.scalars(select(Job))] == [""]


def test_enabled_auth_does_not_warn(
    settings: Settings, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level(logging.WARNING):
        create_app(settings, broker=FakeQueue(), registry_factory=lambda: None)
    assert "DISABLED" not in caplog.text
    assert "DISABLED" not in capsys.readouterr().err


# -- storage of tokens ------------------------------------------------------------------------


def test_only_token_hashes_are_stored(app: Flask, settings: Settings, tokens) -> None:
    with app.app_context(), services().sessions() as session:
        rows = {row.id: row for row in session.scalars(select(ApiToken))}
    for token, token_id in tokens.values():
        row = rows[token_id]
        assert token.startswith("fe_") and len(token) >= 40
        assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
        assert row.prefix == token[:10]
        assert token not in {row.id, row.name, row.token_hash, row.prefix}
    assert {row.role for row in rows.values()} == {"submit", "admin"}
    # Nowhere in the database file (or its write-ahead log) either.
    database = Path(settings.resolved_database_url.removeprefix("sqlite:///"))
    stored = b"".join(
        path.read_bytes() for path in database.parent.glob(database.name + "*") if path.is_file()
    )
    for token, _ in tokens.values():
        assert token.encode() not in stored
        assert token[10:].encode() not in stored


def test_last_used_at_moves_at_most_once_a_minute(app: Flask, client: FlaskClient, tokens) -> None:
    token, token_id = tokens["alice"]

    def last_used() -> datetime | None:
        with app.app_context(), services().sessions() as session:
            value = session.get(ApiToken, token_id).last_used_at
        return value.replace(tzinfo=UTC) if value and value.tzinfo is None else value

    assert last_used() is None
    client.get("/api/v1/jobs", headers=bearer(token))
    first = last_used()
    assert first is not None and datetime.now(UTC) - first < timedelta(seconds=30)
    client.get("/api/v1/jobs", headers=bearer(token))
    assert last_used() == first  # within the minute: no write

    earlier = first - timedelta(minutes=5)
    with app.app_context(), services().sessions() as session:
        session.execute(
            update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=earlier)
        )
        session.commit()
    client.get("/api/v1/jobs", headers=bearer(token))
    assert last_used() > earlier + timedelta(minutes=4)


def test_token_helpers() -> None:
    token = db_tokens.generate_token()
    assert token.startswith("fe_") and len(token) == 46
    assert db_tokens.hash_token(token) == hashlib.sha256(token.encode()).hexdigest()
    assert db_tokens.generate_token() != token


def test_create_token_refuses_unknown_roles(app: Flask) -> None:
    with app.app_context(), services().sessions() as session, pytest.raises(ValueError):
        db_tokens.create_token(session, role="root")


# -- secrets in logs and error bodies ---------------------------------------------------------


def test_tokens_never_reach_logs_or_error_bodies(
    settings: Settings, tokens, caplog: pytest.LogCaptureFixture
) -> None:
    token = tokens["alice"][0]
    app = create_app(settings, broker=FakeQueue(), registry_factory=lambda: None)

    @app.get("/api/v1/boom")
    def boom() -> str:
        raise RuntimeError(f"failed for Authorization: Bearer {token} and {BOOTSTRAP}")

    client = app.test_client()
    bodies: list[str] = []
    with caplog.at_level(logging.DEBUG):
        for headers in (bearer(token), bearer(BOOTSTRAP), bearer(token + "x"), bearer("fe_x")):
            for url in ("/api/v1/jobs", "/api/v1/training-runs", "/api/v1/boom"):
                bodies.append(client.get(url, headers=headers).get_data(as_text=True))
        logging.getLogger("api.jobs").warning("client sent Bearer %s", token)
        logging.getLogger("api.auth").info("token %s", token)
    assert "internal_error" in "".join(bodies)
    assert "unhandled error" in caplog.text
    everything = caplog.text + "".join(bodies)
    assert token not in everything
    assert token[10:] not in everything
    assert BOOTSTRAP not in everything


def test_database_and_broker_passwords_are_redacted_from_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    install_log_redaction(
        Settings(
            database_url="postgresql+psycopg://emotions:hunter2-db@db.internal:5432/emotions",
            broker_url="redis://:broker-pw-42@redis.internal:6379/0",
        ),
        REDACTED_LOGGERS,
    )
    log = logging.getLogger("api.jobs")
    with caplog.at_level(logging.INFO, logger="api.jobs"):
        log.warning("cannot connect to %s", "postgresql://emotions:hunter2-db@db.internal/x")
        try:
            raise ConnectionError("redis://:broker-pw-42@redis.internal:6379/0 refused")
        except ConnectionError:
            log.exception("broker down")
    assert "hunter2-db" not in caplog.text and "broker-pw-42" not in caplog.text
    assert "db.internal" in caplog.text and "ConnectionError" in caplog.text
    assert "hunter2" not in redact("password in s3://key:hunter2-db@bucket/x")
    assert redact_url("redis://:pw@redis.internal:6379/0") == "redis://***@redis.internal:6379/0"
    assert redact_url("sqlite:////var/jobs.db") == "sqlite:////var/jobs.db"


# -- security headers and CORS ----------------------------------------------------------------


def test_security_headers_on_every_response(client: FlaskClient, tokens) -> None:
    token = tokens["alice"][0]
    for response in (
        client.get("/api/v1/jobs", headers=bearer(token)),
        client.get("/api/v1/jobs"),  # 401
        client.get(f"/api/v1/jobs/{uuid.uuid4()}", headers=bearer(token)),  # 404
        client.get("/healthz"),
        client.get("/openapi.json"),
        client.get("/nothing-here"),
    ):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    api = client.get("/api/v1/jobs", headers=bearer(token))
    assert api.headers["Cache-Control"] == "no-store"
    assert "no-store" not in client.get("/healthz").headers.get("Cache-Control", "")


def test_docs_page_keeps_working_under_its_policy(client: FlaskClient) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    csp = response.headers["Content-Security-Policy"]
    page = response.get_data(as_text=True)
    for src in re.findall(r'<script src="(https://[^/"]+)', page):
        assert src in csp, src  # the CDN's scripts may load
    assert "script-src" in csp and "'unsafe-inline'" in csp  # the inline bootstrap runs
    assert "frame-ancestors 'none'" in csp
    assert response.headers["X-Frame-Options"] == "DENY"


@pytest.mark.parametrize("method", ["GET", "OPTIONS"])
def test_no_cors_headers(client: FlaskClient, tokens, method: str) -> None:
    headers = {
        "Origin": "https://evil.example",
        "Access-Control-Request-Method": "POST",
        **bearer(tokens["alice"][0]),
    }
    for url in ("/api/v1/jobs", "/healthz", "/openapi.json"):
        response = client.open(url, method=method, headers=headers)
        assert not [h for h in response.headers if h[0].lower().startswith("access-control-")]
