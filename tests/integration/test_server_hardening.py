"""The API server as compose starts it, attacked below the app: slow clients, requests gunicorn
refuses before Flask runs, secrets in its access log (issue 14, items 1, 8 and 9).

The server is docker-compose.yml's own ``api`` command (gevent workers configured in
api/gunicorn_conf.py), bound to a free port through ``EMOTIONS_API_BIND``.
"""

from __future__ import annotations

import io
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from PIL import Image

from face_emotions.jobs.migrate import upgrade
from scripts.launcher import Launcher
from scripts.launcher import free_port
from tests.integration.conftest import ROOT
from tests.integration.conftest import ModelStore

pytestmark = pytest.mark.integration

#: The issue's measure: at least 200 idle or trickling connections, 20 health checks in 1 s each.
IDLE_CONNECTIONS = 100
TRICKLING_CONNECTIONS = 100
HEALTH_CHECKS = 20
SECRET_TOKEN = "fe_" + "s3cr3t" * 6
AUTH = {"Authorization": f"Bearer {SECRET_TOKEN}"}
JSON = {"Content-Type": "application/json", **AUTH}


def compose_api_command() -> list[str]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    command = compose["services"]["api"]["command"]
    assert command[0] == "gunicorn"
    return [sys.executable, "-m", "gunicorn", *command[1:]]


@dataclass
class Server:
    url: str
    host: str
    port: int
    log_path: Path


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, model_store: ModelStore
) -> Iterator[Server]:
    import os

    tmp = tmp_path_factory.mktemp("server")
    database_url = f"sqlite:///{tmp / 'jobs.db'}"
    upgrade(database_url)
    (tmp / "data").mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMOTIONS_")}
    env.update(
        {
            "EMOTIONS_API_BIND": f"127.0.0.1:{port}",
            "EMOTIONS_DATABASE_URL": database_url,
            "EMOTIONS_BROKER_URL": redis_url,
            "EMOTIONS_VAR_DIR": str(model_store.var_dir),
            "EMOTIONS_DATA_ROOT": str(tmp / "data"),
            "EMOTIONS_MLFLOW_TRACKING_URI": model_store.tracking_uri,
            "EMOTIONS_ADMIN_TOKEN": SECRET_TOKEN,
        }
    )
    log_path = tmp / "api.log"
    url = f"http://127.0.0.1:{port}"
    launcher = Launcher(env, tmp, cwd=ROOT, append_logs=False)
    from scripts.launcher import http_ready

    process = launcher.start(
        "api", compose_api_command(), lambda *_: http_ready(url + "/healthz"), log_path=log_path
    )
    try:
        process.wait_ready(60)
        yield Server(url, "127.0.0.1", port, log_path)
    finally:
        process.stop(15)


class SlowClients:
    """Connections that send nothing, and connections that send a request a header line at a
    time (slow loris); a trickler the server cuts off reconnects, so all stay open."""

    def __init__(self, host: str, port: int, idle: int, trickling: int) -> None:
        self.address = (host, port)
        self.idle = [self._connect() for _ in range(idle)]
        self.trickling = [self._start_request() for _ in range(trickling)]
        self.reconnects = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()

    def _connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=5)

    def _start_request(self) -> socket.socket:
        sock = self._connect()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        return sock

    def _trickle(self) -> None:
        while not self._stop.wait(0.5):
            for index, sock in enumerate(self.trickling):
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    sock.close()
                    self.trickling[index] = self._start_request()
                    self.reconnects += 1

    def open_count(self) -> int:
        return len(self.idle) + len(self.trickling)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.idle + self.trickling:
            sock.close()


def test_hundreds_of_idle_and_trickling_clients_do_not_starve_health_checks(
    server: Server,
) -> None:
    clients = SlowClients(server.host, server.port, IDLE_CONNECTIONS, TRICKLING_CONNECTIONS)
    try:
        time.sleep(1.0)  # the tricklers have sent a few lines; every connection is accepted
        assert clients.open_count() >= 200
        for _ in range(HEALTH_CHECKS):
            started = time.monotonic()
            response = requests.get(server.url + "/healthz", timeout=(1, 1))
            elapsed = time.monotonic() - started
            assert response.status_code == 200
            assert elapsed < 1.0, f"/healthz took {elapsed:.2f} s behind slow clients"
    finally:
        clients.close()


def test_a_request_line_over_the_limit_is_a_json_414_with_security_headers(server: Server) -> None:
    response = requests.get(server.url + "/api/v1/jobs?x=" + "a" * 10_000, timeout=10)
    assert response.status_code == 414
    assert response.json()["error"]["code"] == "uri_too_long"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]


def test_oversized_headers_are_a_json_431_with_security_headers(server: Server) -> None:
    response = requests.get(server.url + "/healthz", headers={"X-Big": "b" * 10_000}, timeout=10)
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "request_header_fields_too_large"
    assert response.headers["X-Frame-Options"] == "DENY"
    many = {f"X-H{i}": "1" for i in range(150)}
    response = requests.get(server.url + "/healthz", headers=many, timeout=10)
    assert response.status_code == 431
    assert response.headers["Content-Type"] == "application/json"


def test_a_malformed_request_is_a_json_400(server: Server) -> None:
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n")
        reply = sock.recv(65536)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert b"application/json" in head and b'"code": "bad_request"' in body


def test_tokens_and_passwords_in_query_strings_never_reach_the_access_log(server: Server) -> None:
    secrets = {"token": "fe_" + "q" * 30, "password": "hunter2hunter2", "api_key": "k3y-v4lue"}
    query = "&".join(f"{name}={value}" for name, value in secrets.items())
    requests.get(f"{server.url}/healthz?{query}", timeout=10)
    requests.get(f"{server.url}/healthz?token={SECRET_TOKEN}", timeout=10)
    requests.get(f"{server.url}/api/v1/jobs?x=" + "a" * 10_000 + "&token=zz9zz9zz9", timeout=10)
    deadline = time.monotonic() + 10
    while "/healthz?" not in server.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = server.log_path.read_text()
    assert "/healthz?" in log, "the access log is on, as compose runs the API"
    for value in [*secrets.values(), SECRET_TOKEN, "zz9zz9zz9"]:
        assert value not in log
    assert "token=***" in log


def test_json_nested_too_deep_is_a_400_not_a_500(server: Server) -> None:
    deep_body = "[" * 100_000 + "]" * 100_000
    deep_field = '{"folder": "x", "batch_size": ' + "[" * 5000 + "]" * 5000 + "}"
    for body in (deep_body, deep_field):
        response = requests.post(server.url + "/api/v1/jobs", data=body, headers=JSON, timeout=30)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_json"


def test_ids_beyond_64_bits_are_404_not_500(server: Server) -> None:
    image = io.BytesIO()
    Image.new("RGB", (8, 8)).save(image, format="PNG")
    created = requests.post(
        server.url + "/api/v1/jobs",
        files={"files": ("a.png", image.getvalue(), "image/png")},
        headers=AUTH,
        timeout=30,
    )
    assert created.status_code == 202, created.text
    job = created.json()["id"]
    for path in (
        f"/api/v1/jobs/{job}/images/{2**64}/thumbnail",
        f"/api/v1/jobs/{job}/images/{2**63}/thumbnail",
        f"/api/v1/jobs/{job}/images/{2**63 - 1}/thumbnail",
        f"/api/v1/models/{2**64}/evaluation",
        f"/api/v1/models/{2**40}/evaluation",
    ):
        response = requests.get(server.url + path, headers=AUTH, timeout=10)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["code"] == "not_found"


def test_a_chunked_json_body_over_the_limit_is_a_413(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"folder": "'
        for _ in range(17):
            yield b"a" * 65536
        yield b'"}'

    response = requests.post(
        server.url + "/api/v1/jobs",
        data=chunks(),
        headers=JSON,
        timeout=30,
    )
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "payload_too_large"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
