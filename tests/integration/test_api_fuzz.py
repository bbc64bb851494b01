"""Fuzz the API from its own OpenAPI document with schemathesis: no input may cause a 5xx.

The app runs in-process (WSGI) with authentication on, a temporary SQLite database, a fake
queue that also takes training runs and broadcasts, and a fake registry, so every operation is
reachable and the only server errors left to find are the API's own. Requests carry the
bootstrap admin token (schemathesis adds its own unauthenticated variants too).

Kept fast and reproducible: a fixed number of examples per operation, hypothesis derandomised
(the same inputs on every run), no example database.
"""

from __future__ import annotations

import contextlib
import io
import uuid
import warnings
import zipfile
from collections import Counter
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from flask import request
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from werkzeug.datastructures import FileStorage

from api import create_app
from face_emotions.settings import Settings
from tests.fakes import FakeBroker as FuzzQueue
from tests.fakes import FakeRegistry

pytestmark = pytest.mark.integration

TOKEN = "fuzz-bootstrap-admin-token"
#: (method, route) -> status codes the fuzzed app answered, for the coverage check at the end.
SEEN: dict[tuple[str, str], Counter[int]] = defaultdict(Counter)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_EXAMPLES = 20


def fuzz_registry() -> FakeRegistry:
    """Two versions, v1 champion with an evaluation report, v2 without one."""
    matrix = [[2 if i == j else 0 for j in range(5)] for i in range(5)]
    metrics = {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    report = {
        "num_images": 10,
        "accuracy": 1.0,
        "weighted_f1": 1.0,
        "macro_f1": 1.0,
        "per_class": dict.fromkeys(["Angry", "Fear", "Happy", "Sad", "Surprised"], metrics),
        "confusion_matrix": matrix,
        "passed": True,
        "failures": [],
    }
    return FakeRegistry(
        [1, 2], 1, tags={"architecture": "cnn", "accuracy": "0.9"}, evaluations={1: report}
    )


@pytest.fixture(scope="module")
def api_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "data" / "faces" / "Happy").mkdir(parents=True)
    config = Settings(
        var_dir=root / "var",
        data_root=root / "data",
        admin_token=TOKEN,
        auth="enabled",
        broker_url="memory://",
        max_upload_mb=1,
        max_images_per_job=20,
        # The fuzzer submits many jobs quickly: limits are tested in test_security.py.
        submit_rate_limit="100000/minute",
    )
    app = create_app(config, broker=FuzzQueue(), registry_factory=fuzz_registry)
    app.config["TESTING"] = False  # exceptions become 500s, as in production

    @app.after_request
    def record(response: Any) -> Any:
        rule = request.url_rule.rule if request.url_rule is not None else "?"
        SEEN[(request.method, rule)][response.status_code] += 1
        return response

    # One real job, so that some generated ids and pages hit rows.
    client = app.test_client()
    client.post("/api/v1/jobs", json={"folder": "faces"}, headers=AUTH)
    yield app


def _spec_app() -> Any:
    """An app built only to serve its OpenAPI document at collection time.

    In-memory SQLite and no migrations: importing this module touches no disk. (Schemathesis'
    fixture-based lazy loader does not work with pytest 9, so the schema is loaded eagerly and
    the requests go to the module's real app through ``call_and_validate(app=...)``.)
    """
    config = Settings(
        database_url="sqlite://", broker_url="memory://", admin_token=TOKEN, migrate_on_start=False
    )
    return create_app(config, broker=FuzzQueue(), registry_factory=fuzz_registry)


schema = schemathesis.openapi.from_wsgi("/openapi.json", _spec_app())


def errors_have_the_documented_shape(ctx: Any, response: Any, case: Any) -> None:
    """Every JSON error is ``{"error": {"code", "message"}}``, whatever caused it."""
    if response.status_code < 400:
        return
    headers = {name.lower(): value for name, value in response.headers.items()}
    content_type = headers.get("content-type", "")
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    assert content_type.startswith("application/json"), content_type
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"].get("code"), str) and body["error"].get("message"), body


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_input_causes_a_server_error(case: Any, api_app: Any) -> None:
    case.call_and_validate(
        app=api_app,
        headers={**AUTH, "Idempotency-Key": uuid.uuid4().hex},
        checks=[not_a_server_error, errors_have_the_documented_shape],
    )


# Schemathesis sends multipart parts without file names, so uploads reach the API as plain
# form fields; this test sends real file parts and archives with hostile names, types and bytes.
NAMES = st.one_of(
    st.sampled_from(
        ["a.png", "../../x.png", "/etc/x.jpg", "C:\\x.png", "con.png", ".hidden.png", "x.zip"]
    ),
    st.text(min_size=0, max_size=40),
)
PART_TYPES = st.one_of(
    st.none(),
    st.sampled_from(["image/png", "application/octet-stream", "text/html", "application/zip"]),
    st.text(max_size=30),
)
ZIP_ENTRIES = st.lists(
    st.tuples(
        st.one_of(NAMES, st.sampled_from(["../a.png", "/abs.png", "d/../../e.png", "ok/f.png"])),
        st.binary(max_size=2048),
    ),
    max_size=6,
)


def zipped(entries: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
        warnings.simplefilter("ignore")  # duplicate names are part of the point
        for name, data in entries:
            with contextlib.suppress(ValueError):  # names zipfile itself refuses
                archive.writestr(name or "empty", data)
    return buffer.getvalue()


@settings(
    max_examples=60,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    parts=st.lists(
        st.tuples(NAMES, st.one_of(st.binary(max_size=4096), ZIP_ENTRIES.map(zipped)), PART_TYPES),
        max_size=4,
    ),
    fields=st.dictionaries(
        st.sampled_from(["batch_size", "model_version", "folder", "other"]),
        st.one_of(st.text(max_size=12), st.integers().map(str)),
        max_size=3,
    ),
)
def test_uploads_never_cause_a_server_error(
    api_app: Any, parts: list[tuple[str, bytes, str | None]], fields: dict[str, str]
) -> None:
    files = [
        FileStorage(io.BytesIO(data), filename=name, content_type=content_type)
        for name, data, content_type in parts
    ]
    response = api_app.test_client().post(
        "/api/v1/jobs",
        data={"files": files, **fields},
        content_type="multipart/form-data",
        headers=AUTH,
    )
    assert response.status_code < 500, response.get_data(as_text=True)
    if response.status_code >= 400:
        assert set(response.get_json()["error"]) == {"code", "message"}


def test_the_spec_covers_every_route() -> None:
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {operation.label for operation in operations}
    assert "POST /api/v1/jobs" in labels and "POST /api/v1/models/{version}/promote" in labels
    # with DELETE /api/v1/training-runs/{run_id} (cancel), POST /api/v1/models (import) and
    # GET /api/v1/models/{version}/artifact (export)
    assert len(labels) == 18


def test_the_fuzzer_reached_every_operation() -> None:
    """Guards the guard: every documented operation was called, and answered below 500."""
    answered = {key: counts for key, counts in SEEN.items() if key[1] != "?"}
    operations = {(m, r) for m, r in answered if r.startswith("/api/") or r in {"/healthz"}}
    assert len(operations) >= 12, sorted(answered)
    assert sum(sum(c.values()) for c in answered.values()) >= 12 * MAX_EXAMPLES // 2
    statuses = Counter[int]()
    for counts in SEEN.values():
        statuses.update(counts)
    assert not [status for status in statuses if status >= 500], statuses
    print("\nfuzzed responses by status:", dict(sorted(statuses.items())))
    for key in sorted(answered):
        print(key, dict(sorted(answered[key].items())))


def test_storage_stays_inside_the_sandbox(api_app: Any) -> None:
    """After fuzzing, every stored upload is below the storage root."""
    from face_emotions.data.storage import local_path

    storage = Path(local_path(api_app.extensions["face_emotions"].settings.resolved_storage_url))
    jobs = storage / "jobs"
    assert all(jobs in p.parents for p in storage.rglob("*") if p.is_file())
