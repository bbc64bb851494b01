"""``/docs`` works offline: Swagger UI's files come from the API, never from a CDN."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from api import create_app
from api.docs_assets import ASSETS
from api.docs_assets import ASSETS_URL
from tests.unit.test_api import FakeQueue
from tests.unit.test_api import FakeRegistry
from tests.unit.test_api import api_settings
from tests.unit.test_api import version


@pytest.fixture
def client(tmp_path: Path):
    app = create_app(
        api_settings(tmp_path),
        broker=FakeQueue(),
        registry_factory=lambda: FakeRegistry([version(1)]),
    )
    return app.test_client()


def test_docs_page_loads_swagger_ui_from_this_origin(client) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    for filename in ASSETS.values():
        assert f"{ASSETS_URL}/{filename}" in html
    assert not re.findall(r'(?:src|href)="(?:https?:)?//', html), "a third-party file"
    assert client.get(re.search(r'rel="icon"[^>]*href="([^"]+)"', html)[1]).status_code == 200
    policy = page.headers["Content-Security-Policy"]
    assert "http" not in policy, policy  # no third-party origin is allowed any more


@pytest.mark.parametrize("filename", sorted(ASSETS.values()))
def test_swagger_ui_files_are_served(client, filename: str) -> None:
    response = client.get(f"{ASSETS_URL}/{filename}")
    assert response.status_code == 200
    assert len(response.get_data()) > 10_000
    kind = "text/css" if filename.endswith(".css") else "javascript"
    assert kind in response.content_type


@pytest.mark.parametrize("path", ["missing.js", "../__init__.py", "..%2f__init__.py"])
def test_nothing_else_is_served_from_the_assets_folder(client, path: str) -> None:
    assert client.get(f"{ASSETS_URL}/{path}").status_code == 404


def test_the_assets_route_is_not_in_the_api_spec(client) -> None:
    spec = client.get("/openapi.json").get_json()
    assert not any(path.startswith(ASSETS_URL) for path in spec["paths"])
