"""The web console with Flask's test client: pages, static files, their security policy, and
the two API routes written for it (image thumbnails, a version's evaluation).

The pages' behaviour in a browser is tested in tests/integration/test_console_browser.py.
"""

from __future__ import annotations

import io
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from PIL import Image as PILImage

from api import create_app
from api.security import CONSOLE_CSP
from api.security import JSON_CSP
from face_emotions.labels import EMOTIONS
from face_emotions.registry.mlflow_registry import RegistryError
from face_emotions.settings import Settings
from tests.unit.test_api import FakeQueue
from tests.unit.test_api import FakeRegistry
from tests.unit.test_api import api_settings
from tests.unit.test_api import authed_client
from tests.unit.test_api import job_images
from tests.unit.test_api import simulate_worker
from tests.unit.test_api import upload
from tests.unit.test_api import version

API_ROOT = Path(__file__).resolve().parents[2] / "api"
TEMPLATES = API_ROOT / "templates"
STATIC = API_ROOT / "static"

EVALUATION = {
    "num_images": 20,
    "accuracy": 0.8,
    "weighted_f1": 0.79,
    "macro_f1": 0.78,
    "per_class": {
        name: {"precision": 0.8, "recall": 0.8, "f1": 0.8, "support": 4} for name in EMOTIONS
    },
    "confusion_matrix": [[4 if i == j else 0 for j in range(5)] for i in range(5)],
    "targets": {"accuracy": 0.88},
    "failures": ["accuracy 0.8000 <= 0.88"],
    "passed": False,
    "classes": list(EMOTIONS),
}


class EvaluatingRegistry(FakeRegistry):
    """v2 has a logged evaluation, v1 none; other numbers do not exist."""

    def evaluation(self, number: int) -> dict[str, Any] | None:
        if not self.up:
            raise ConnectionError("registry down")
        if number not in {v.version for v in self.versions}:
            raise RegistryError(f"face-emotion has no version {number}")
        return EVALUATION if number == 2 else None


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return api_settings(tmp_path)


@pytest.fixture
def registry() -> EvaluatingRegistry:
    return EvaluatingRegistry([version(2, ("champion",)), version(1)])


@pytest.fixture
def app(settings: Settings, registry: EvaluatingRegistry):
    return create_app(settings, broker=FakeQueue(), registry_factory=lambda: registry)


@pytest.fixture
def client(app) -> FlaskClient:
    return authed_client(app)


# -- pages ----------------------------------------------------------------------------------


def labels_of(html: str) -> dict[str, str]:
    """``for`` -> label text of every <label>."""
    return {
        target: re.sub(r"<[^>]+>|\s+", " ", text).strip()
        for target, text in re.findall(r'<label for="([^"]+)"[^>]*>(.*?)</label>', html, re.S)
    }


def ids_of(html: str) -> set[str]:
    return set(re.findall(r'\bid="([^"]+)"', html))


@pytest.mark.parametrize(
    ("url", "labels", "script"),
    [
        ("/", {"api-token", "files", "folder", "recursive", "batch_size", "faces"}, "home.js"),
        (
            f"/jobs/{uuid.UUID(int=7)}",
            {"api-token", "filter-emotion", "sort-order"},
            "job.js",
        ),
        (
            "/models",
            {"api-token", "matrix-version", "train-data", "train-model", "train-promote"},
            "models.js",
        ),
    ],
)
def test_pages_load_without_a_token(app, url: str, labels: set[str], script: str) -> None:
    response = app.test_client().get(url)  # no Authorization header at all
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    found = labels_of(html)
    assert labels <= set(found), found
    assert all(found.values()), found  # no empty label
    assert labels <= ids_of(html)  # every label points at a field of the page
    assert f'src="/static/{script}"' in html and 'src="/static/console.js"' in html
    assert 'role="status"' in html and 'aria-live="polite"' in html
    assert '<main id="main"' in html and 'lang="en"' in html
    assert 'name="viewport"' in html
    # Unnamed: a native form submit (script failed) can't put the token into a URL.
    token_field = re.search(r'<input id="api-token"[^>]*>', html)
    assert token_field and " name=" not in token_field[0]


def test_home_page_submits_with_the_api_field_names(app) -> None:
    html = app.test_client().get("/").get_data(as_text=True)
    assert re.search(r'<input id="files" name="files" type="file" multiple', html)
    assert 'accept="image/*' in html and ".zip" in html
    assert 'id="batch_size" name="batch_size" type="number"' in html
    assert 'max="1024"' in html
    assert re.search(r'<button type="submit" id="submit-button">', html)
    home_js = (STATIC / "home.js").read_text()
    assert 'body.append("files"' in home_js and 'body.append("batch_size"' in home_js
    assert '"/api/v1/jobs"' in home_js


def test_job_page_names_the_job_and_every_emotion(app) -> None:
    job_id = str(uuid.uuid4())
    html = app.test_client().get(f"/jobs/{job_id}").get_data(as_text=True)
    assert f'data-job-id="{job_id}"' in html
    assert 'role="progressbar"' in html and 'aria-valuenow="0"' in html
    for emotion in EMOTIONS:
        assert f'<option value="{emotion}">{emotion}</option>' in html
    assert 'id="download-csv"' in html and 'id="download-jsonl"' in html


def test_unknown_console_paths_are_json_404(app) -> None:
    client = app.test_client()
    for url in ("/jobs/not-a-uuid", "/jobs/", "/model", "/static/nothing.js"):
        response = client.get(url)
        assert response.status_code == 404, url
        assert response.get_json()["error"]["code"] == "not_found"


def test_auth_disabled_says_so(settings: Settings) -> None:
    app = create_app(
        settings.model_copy(update={"auth": "disabled"}),
        broker=FakeQueue(),
        registry_factory=lambda: FakeRegistry([]),
    )
    html = app.test_client().get("/").get_data(as_text=True)
    assert 'data-auth="disabled"' in html
    assert "Authentication is disabled" in html


# -- static files and the security policy ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "mimetype"),
    [
        ("console.js", "text/javascript"),
        ("home.js", "text/javascript"),
        ("job.js", "text/javascript"),
        ("models.js", "text/javascript"),
        ("console.css", "text/css"),
        ("favicon.svg", "image/svg+xml"),
    ],
)
def test_static_files_are_served(app, name: str, mimetype: str) -> None:
    response = app.test_client().get(f"/static/{name}")
    assert response.status_code == 200
    assert response.mimetype == mimetype
    assert response.get_data() == (STATIC / name).read_bytes()
    assert response.headers["Content-Security-Policy"] == CONSOLE_CSP
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    response.close()


def test_console_policy_allows_own_scripts_only(app, client: FlaskClient) -> None:
    for url in ("/", f"/jobs/{uuid.uuid4()}", "/models"):
        response = app.test_client().get(url)
        csp = response.headers["Content-Security-Policy"]
        assert csp == CONSOLE_CSP
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["default-src"] == "'none'"
        assert directives["script-src"] == "'self'"  # no 'unsafe-inline', no CDN, no eval
        assert directives["style-src"] == "'self'"
        assert directives["img-src"] == "'self' blob: data:"
        assert directives["connect-src"] == "'self'"
        assert directives["frame-ancestors"] == "'none'"
        assert response.headers["X-Frame-Options"] == "DENY"
    # The API keeps its strict policy.
    for url in ("/api/v1/jobs", "/healthz", "/openapi.json", "/nothing"):
        assert client.get(url).headers["Content-Security-Policy"] == JSON_CSP, url


def test_no_inline_script_style_or_handler_in_templates() -> None:
    templates = sorted(TEMPLATES.rglob("*.html"))
    assert len(templates) == 4
    for path in templates:
        html = path.read_text()
        for match in re.finditer(r"<script\b([^>]*)>(.*?)</script>", html, re.S):
            assert "src=" in match[1] and not match[2].strip(), (path.name, match[0])
        assert "<style" not in html, path.name
        assert not re.search(r"\sstyle=", html), path.name
        assert not re.search(r"\son[a-z]+=", html, re.I), path.name  # onclick= ...
        assert "javascript:" not in html, path.name
        assert not re.search(r'(src|href)="(https?:)?//', html), path.name  # no CDN


def test_scripts_build_markup_without_inner_html() -> None:
    """API values are untrusted text: the scripts never parse them as markup."""
    for path in STATIC.glob("*.js"):
        source = path.read_text()
        for forbidden in (".innerHTML", ".outerHTML", ".insertAdjacentHTML", "document.write("):
            assert forbidden not in source, (path.name, forbidden)
        assert not re.search(r"\beval\(|new Function\(", source), path.name


# -- thumbnails -----------------------------------------------------------------------------


def big_png(size: tuple[int, int] = (600, 300)) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", size, (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_results_name_their_images_and_thumbnails_answer(app, client: FlaskClient) -> None:
    job_id = upload(client, [f"img{i}.png" for i in range(5)]).get_json()["id"]
    ids = simulate_worker(app, job_id)
    items = client.get(f"/api/v1/jobs/{job_id}/results?limit=10").get_json()["items"]
    assert [item["image_id"] for item in items] == ids

    response = client.get(f"/api/v1/jobs/{job_id}/images/{ids[0]}/thumbnail")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "image/jpeg"
    assert response.headers["Cache-Control"] == "no-store"
    with PILImage.open(io.BytesIO(response.get_data())) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (8, 8)

    # Exports keep the seed's shape: no image ids there.
    jsonl = client.get(f"/api/v1/jobs/{job_id}/results?format=jsonl").get_data(as_text=True)
    assert '"image_id"' not in jsonl


def test_thumbnail_is_small_and_needs_a_token(app, client: FlaskClient) -> None:
    response = client.post(
        "/api/v1/jobs",
        data={"files": [(io.BytesIO(big_png()), "wide.png")]},
        content_type="multipart/form-data",
    )
    job_id = response.get_json()["id"]
    image_id = client.get(f"/api/v1/jobs/{job_id}/results").get_json()["items"]
    assert image_id == []  # no result yet: the thumbnail works before the worker ran
    (image,) = job_images(app, job_id)
    url = f"/api/v1/jobs/{job_id}/images/{image.id}/thumbnail"
    with PILImage.open(io.BytesIO(client.get(url).get_data())) as thumb:
        assert thumb.size == (256, 128)
    anonymous = app.test_client().get(url)
    assert anonymous.status_code == 401
    assert anonymous.get_json()["error"]["code"] == "unauthorized"


def test_thumbnail_404s_and_unreadable_images(app, client: FlaskClient, settings) -> None:
    job_id = upload(client, ["a.png", "b.png"]).get_json()["id"]
    first, second = job_images(app, job_id)
    other_job = upload(client, ["c.png"]).get_json()["id"]
    for url in (
        f"/api/v1/jobs/{uuid.uuid4()}/images/{first.id}/thumbnail",  # unknown job
        f"/api/v1/jobs/{job_id}/images/999999/thumbnail",  # unknown image
        f"/api/v1/jobs/{other_job}/images/{first.id}/thumbnail",  # another job's image
    ):
        response = client.get(url)
        assert response.status_code == 404, url
        assert response.get_json()["error"]["code"] == "not_found"

    path = Path(second.location.removeprefix("file://"))
    path.write_bytes(b"not an image at all")
    broken = client.get(f"/api/v1/jobs/{job_id}/images/{second.id}/thumbnail")
    assert broken.status_code == 422
    assert broken.get_json()["error"]["code"] == "unreadable_image"
    path.unlink()
    gone = client.get(f"/api/v1/jobs/{job_id}/images/{second.id}/thumbnail")
    assert gone.status_code == 404 and "gone" in gone.get_json()["error"]["message"]


# -- a version's evaluation (the console's confusion matrix) --------------------------------


def test_model_evaluation(client: FlaskClient, registry: EvaluatingRegistry) -> None:
    body = client.get("/api/v1/models/2/evaluation").get_json()
    assert body["version"] == 2
    assert body["classes"] == list(EMOTIONS)
    assert body["confusion_matrix"] == EVALUATION["confusion_matrix"]
    assert body["per_class"]["Happy"] == {"precision": 0.8, "recall": 0.8, "f1": 0.8, "support": 4}
    assert (body["num_images"], body["accuracy"], body["passed"]) == (20, 0.8, False)
    assert body["failures"] == EVALUATION["failures"]

    none = client.get("/api/v1/models/1/evaluation")
    assert none.status_code == 404 and none.get_json()["error"]["code"] == "no_evaluation"
    for number in (3, 0, 2**40):
        missing = client.get(f"/api/v1/models/{number}/evaluation")
        assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "not_found"
    registry.up = False
    down = client.get("/api/v1/models/2/evaluation")
    assert down.status_code == 503
    assert down.get_json()["error"]["code"] == "registry_unavailable"
