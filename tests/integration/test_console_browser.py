"""The web console in a real browser (the system's Chromium, driven by Playwright) against a
real gunicorn API, a real Celery worker, Redis, PostgreSQL and an MLflow store.

Upload three faces through the page, watch the job reach 100 %, open its page, read the
cards, download the CSV, use the filters, promote from the models page, and check that the
pages fit a phone's width. Screenshots land in ``test-artifacts/`` at the repository root.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest

from face_emotions.labels import EMOTIONS
from tests.contract import CSV_HEADER
from tests.integration.conftest import ROOT
from tests.integration.conftest import gunicorn
from tests.integration.test_batch_jobs import write_faces
from tests.real_photos import group_photo
from tests.real_photos import skimage_photo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
]
ARTIFACTS = ROOT / "test-artifacts"
CONSOLE_GUNICORN = ("--workers", "1")
DESKTOP = {"width": 1280, "height": 900}
#: How long a browser assertion waits for a job to finish: a cold worker on a busy 2-core
#: machine loads its model and detector first (playwright's expect waits only 5 s).
JOB_SECONDS = 120
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the console's browser test needs the system's Chromium "
            "(`make test` installs it through scripts/system_deps.sh; run pytest through make, "
            "or `apt-get install -y chromium`). Playwright's own browser downloads are not used."
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def console_url(services, tmp_path: Path) -> Iterator[str]:
    # Threads, as in production: the browser asks for thumbnails in parallel.
    with gunicorn(services.env(), tmp_path / "api.log", *CONSOLE_GUNICORN) as url:
        yield url


def log_evaluation(registry, version: int, folder: Path) -> None:
    """Log a test-split report into the version's run, as ``training.train`` does."""
    import numpy as np

    from face_emotions.modeling.evaluation import evaluate_predictions

    truth = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    predicted = np.array([0, 1, 1, 1, 2, 2, 3, 2, 4, 0])
    report = evaluate_predictions(truth, predicted).write_json(folder / "evaluation.json")
    run_id = registry.get_version(version).run_id
    registry.client.log_artifact(run_id, str(report), "evaluation")


def no_horizontal_overflow(page) -> tuple[int, int]:
    return page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


@pytest.mark.parametrize("services", ["postgresql"], indirect=True)
def test_console_upload_follow_results_export(
    services, console_url: str, start_worker, model_store, browser, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    start_worker()
    faces = write_faces(tmp_path / "upload", 3, size=96)
    context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    context.set_default_timeout(30_000)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    page.on(
        "console",
        lambda message: (
            problems.append(message.text)
            # A 404 the page expects (no evaluation logged) is reported as a failed resource.
            if message.type == "error" and not message.text.startswith("Failed to load resource")
            else None
        ),
    )

    # -- home: upload three faces through the file input, watch the job reach 100 % ---------
    page.goto(console_url + "/")
    expect(page.get_by_label("API token")).to_be_visible()
    page.get_by_label("Choose images or a .zip").set_input_files([str(f) for f in faces])
    expect(page.locator("#file-summary")).to_contain_text("3 files")
    page.get_by_label("Batch size (optional)").fill("2")
    page.get_by_role("button", name="Submit job").click()
    expect(page.get_by_role("status")).to_contain_text("accepted: 3 image(s)")
    job = page.locator("#jobs li.job-item").first
    job_id = job.get_attribute("data-job-id")
    assert job_id
    # The worker's first task loads (and, with EMOTIONS_BACKEND=auto, times) the model: on a
    # loaded 2-core machine that took more than expect()'s 5 s default.
    expect(job.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100", timeout=60_000)
    expect(job.locator(".progress-text")).to_contain_text("100% · 3 / 3")
    expect(job.locator(".badge")).to_have_text("succeeded", timeout=JOB_SECONDS * 1000)
    expect(job.get_by_role("button", name=f"Cancel job {job_id}")).to_have_count(0)

    # -- job page: progress, chart, three cards with five probabilities each ---------------
    job.get_by_role("link", name=f"Open job {job_id}").click()
    page.wait_for_url(f"**/jobs/{job_id}")
    expect(page.locator("#job-progress")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=JOB_SECONDS * 1000)
    expect(page.locator("#summary-chart .bar-row")).to_have_count(len(EMOTIONS))
    cards = page.locator("#results li.result-card")
    expect(cards).to_have_count(3)
    expect(page.locator("#results .thumb img")).to_have_count(3)
    page.wait_for_function(
        "[...document.querySelectorAll('#results .thumb img')]"
        ".every(img => img.complete && img.naturalWidth > 0)"
    )
    emotions, confidences = [], []
    for index in range(3):
        card = cards.nth(index)
        emotion = card.locator(".emotion").inner_text()
        assert emotion in EMOTIONS
        emotions.append(emotion)
        confidences.append(float(card.locator(".confidence").inner_text().rstrip("%")))
        probabilities = card.locator(".probs li")
        expect(probabilities).to_have_count(5)
        names = probabilities.locator(".prob-name").all_inner_texts()
        assert names == list(EMOTIONS)
        values = [float(v) for v in probabilities.locator(".prob-value").all_inner_texts()]
        assert all(0 <= v <= 1 for v in values) and abs(sum(values) - 1) < 0.01
    names = cards.locator(".result-name").all_inner_texts()
    assert names == [face.name for face in faces]

    # CSV export: fetched with the (here: absent) token, saved through a download.
    with page.expect_download() as download_info:
        page.get_by_role("button", name="Download CSV").click()
    download = download_info.value
    assert download.suggested_filename == f"{job_id}-results.csv"
    with open(download.path(), newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == CSV_HEADER
    assert len(rows) == 1 + 3  # one face (or the whole image) each
    assert sorted(row[0] for row in rows[1:]) == sorted(face.name for face in faces)

    # Filter and sort run on the loaded results.
    page.get_by_label("Show", exact=True).select_option(emotions[0])
    expect(cards).to_have_count(emotions.count(emotions[0]))
    page.get_by_label("Show", exact=True).select_option("")
    page.get_by_label("Sort", exact=True).select_option("asc")
    expect(cards).to_have_count(3)
    shown = [float(t.rstrip("%")) for t in cards.locator(".confidence").all_inner_texts()]
    assert shown == sorted(confidences)

    screenshot(page, "console-job-desktop.png")
    page.set_viewport_size(PHONE)
    scroll_width, inner_width = no_horizontal_overflow(page)
    assert scroll_width <= inner_width, "job page overflows a phone's width"
    screenshot(page, "console-job-phone.png")
    page.goto(console_url + "/")
    expect(page.locator("#jobs li.job-item")).to_have_count(1)
    scroll_width, inner_width = no_horizontal_overflow(page)
    assert scroll_width <= inner_width, "home page overflows a phone's width"
    screenshot(page, "console-home-phone.png")

    # -- models: versions, champion, live worker, confusion matrix, promote (and back) -------
    champion, other = model_store.versions
    log_evaluation(model_store.registry(), other, tmp_path)
    page.set_viewport_size(DESKTOP)
    page.goto(console_url + "/models")
    versions = page.locator("#versions tbody tr")
    expect(versions).to_have_count(len(model_store.versions))
    expect(page.locator(f'#versions tr[data-version="{champion}"]')).to_contain_text("champion")
    expect(page.locator("#workers tbody tr")).to_have_count(1)
    expect(page.locator("#workers tbody tr")).to_contain_text(f"v{champion} (champion)")
    expect(page.locator("#matrix")).to_contain_text("has no recorded evaluation")
    page.get_by_label("Version", exact=True).select_option(str(other))
    matrix = page.locator("#matrix table.matrix")
    expect(matrix.locator("tbody tr")).to_have_count(len(EMOTIONS))
    expect(matrix.locator("tbody tr").first.locator("td")).to_have_count(len(EMOTIONS) + 1)
    expect(matrix.locator("caption")).to_contain_text("10 test images, accuracy 70.0%")
    assert matrix.locator("tbody tr").first.locator("td").all_inner_texts()[:2] == ["1", "1"]
    expect(page.locator("#runs-note")).to_contain_text("No training run yet")
    # No trainer runs here: the page says why a training run would wait.
    expect(page.locator("#queue-warnings")).to_contain_text("no trainer is consuming")
    try:
        page.get_by_role("button", name=f"Promote version {other}").click()
        expect(page.get_by_role("status")).to_contain_text(
            f"Version {other} is now champion (was version {champion})"
        )
        expect(page.locator(f'#versions tr[data-version="{other}"]')).to_contain_text("serving")
        screenshot(page, "console-models-desktop.png")
        page.set_viewport_size(PHONE)
        scroll_width, inner_width = no_horizontal_overflow(page)
        assert scroll_width <= inner_width, "models page overflows a phone's width"
    finally:
        model_store.registry().set_alias(champion)

    # An API error is shown in the page, not swallowed.
    page.get_by_label("Labelled folder (relative to the data root)").fill("../outside")
    page.get_by_role("button", name="Start training run").click()
    expect(page.get_by_role("alert")).to_contain_text("[")  # "message [code]"
    assert problems == [], problems
    context.close()


@pytest.mark.parametrize("services", ["sqlite"], indirect=True)
def test_console_draws_every_face_and_filters_images_without_one(
    services, console_url: str, start_worker, browser
) -> None:
    """Real photos: a box and a label over each face of the thumbnails, where the detector put
    it; the filters show the image without a face and the one with several."""
    from playwright.sync_api import expect

    start_worker()
    photos = [group_photo(), skimage_photo("astronaut.png"), skimage_photo("coffee.png")]
    context = browser.new_context(viewport=DESKTOP)
    context.set_default_timeout(60_000)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    page.goto(console_url + "/")
    page.get_by_label("Choose images or a .zip").set_input_files([str(p) for p in photos])
    page.get_by_role("button", name="Submit job").click()
    job = page.locator("#jobs li.job-item").first
    expect(job.locator(".badge")).to_have_text("succeeded", timeout=JOB_SECONDS * 1000)
    job_id = job.get_attribute("data-job-id")
    page.goto(f"{console_url}/jobs/{job_id}")

    cards = page.locator("#results li.result-card")
    expect(cards).to_have_count(3)
    group_card = cards.filter(has_text=photos[0].name)
    boxes = group_card.locator(".face-box")
    expect(boxes).to_have_count(6)
    expect(group_card.locator(".result-faces")).to_contain_text("6 faces")
    expect(cards.filter(has_text="astronaut.png").locator(".face-box")).to_have_count(1)
    coffee = cards.filter(has_text="coffee.png")
    expect(coffee.locator(".face-box")).to_have_count(0)
    expect(coffee.locator(".result-faces")).to_contain_text("no face found")
    expect(page.locator("#summary-faces")).to_contain_text("7 face(s) found in 2 image(s)")

    # Each box sits over its face: its place in the picture is the detector's box in the
    # photo, scaled (the largest face first).
    frame = group_card.locator(".thumb-frame").bounding_box()
    largest = boxes.first.bounding_box()
    assert frame and largest
    item = next(
        i
        for i in page.evaluate(
            f"fetch('/api/v1/jobs/{job_id}/results').then(r => r.json()).then(b => b.items)"
        )
        if i["image_path"] == photos[0].name
    )
    width, height = item["image_size"]
    x0, y0, x1, y1 = item["faces"][0]["box"]
    assert abs((largest["x"] - frame["x"]) / frame["width"] - x0 / width) < 0.02
    assert abs((largest["y"] - frame["y"]) / frame["height"] - y0 / height) < 0.02
    assert abs(largest["width"] / frame["width"] - (x1 - x0) / width) < 0.02
    assert abs(largest["height"] / frame["height"] - (y1 - y0) / height) < 0.02
    expect(boxes.first.locator(".face-label")).to_contain_text(
        item["faces"][0]["predicted_emotion"]
    )

    page.get_by_label("Show", exact=True).select_option("__noface__")
    expect(cards).to_have_count(1)
    expect(cards.first).to_contain_text("coffee.png")
    page.get_by_label("Show", exact=True).select_option("__several__")
    expect(cards).to_have_count(1)
    expect(cards.first).to_contain_text(photos[0].name)
    page.get_by_label("Show", exact=True).select_option("")
    screenshot(page, "console-job-faces.png")

    # The submit form sends the face policy the user picks.
    page.goto(console_url + "/")
    page.get_by_label("Choose images or a .zip").set_input_files([str(photos[0])])
    page.get_by_label("Faces", exact=True).select_option("none")
    page.get_by_role("button", name="Submit job").click()
    expect(page.locator("#jobs li.job-item")).to_have_count(2)
    whole = page.locator("#jobs li.job-item").first  # newest first
    expect(whole.locator(".badge")).to_have_text("succeeded", timeout=JOB_SECONDS * 1000)
    whole_id = whole.get_attribute("data-job-id")
    job = page.evaluate(f"fetch('/api/v1/jobs/{whole_id}').then(r => r.json())")
    assert job["face_policy"] == "none"
    assert problems == [], problems
    context.close()


@pytest.mark.parametrize("services", ["sqlite"], indirect=True)
def test_console_sends_the_typed_token(services, browser, tmp_path: Path) -> None:
    """With authentication on, the pages load without a token, the API's 401 is shown in the
    page, and the token typed into the page is what the scripts send."""
    from playwright.sync_api import expect

    token = "console-admin-token-0123456789"
    env = services.env(EMOTIONS_AUTH="enabled", EMOTIONS_ADMIN_TOKEN=token)
    with gunicorn(env, tmp_path / "api.log", *CONSOLE_GUNICORN) as url:
        context = browser.new_context(viewport=PHONE)
        context.set_default_timeout(20_000)
        page = context.new_page()
        page.goto(url + "/")
        alert = page.get_by_role("alert")
        expect(alert).to_contain_text("enter an API token above")
        expect(alert).to_contain_text("[unauthorized]")

        page.get_by_label("API token").fill("fe_wrong-token-000000000000")
        page.get_by_role("button", name="Use token").click()
        expect(alert).to_contain_text("invalid or revoked token")
        expect(alert).to_contain_text("check the API token above")

        page.get_by_label("API token").fill(token)
        with page.expect_request(lambda r: r.url.endswith("/api/v1/jobs?limit=20")) as sent:
            page.get_by_role("button", name="Use token").click()
        assert sent.value.headers["authorization"] == f"Bearer {token}"
        expect(page.get_by_text("No jobs yet.")).to_be_visible()
        expect(alert).to_be_hidden()
        # Kept for the tab: the next page sends it without asking again.
        page.goto(url + "/models")
        expect(page.locator("#versions tbody tr").first).to_be_visible()
        expect(page.get_by_label("API token")).to_have_value(token)
        scroll_width, inner_width = no_horizontal_overflow(page)
        assert scroll_width <= inner_width, "models page overflows a phone's width"
        context.close()


@pytest.mark.parametrize("services", ["sqlite"], indirect=True)
def test_api_docs_render_offline(console_url: str, browser) -> None:
    """/docs renders Swagger UI from the API's own files: no request leaves this origin."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport=DESKTOP)
    context.set_default_timeout(20_000)
    page = context.new_page()
    foreign: list[str] = []
    page.on(
        "request",
        lambda request: (
            None
            if request.url.startswith(console_url) or request.url.startswith("data:")
            else foreign.append(request.url)
        ),
    )
    page.goto(console_url + "/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("face-emotions")
    expect(page.locator(".opblock-tag-section").first).to_be_visible()
    context.close()
    assert foreign == []
