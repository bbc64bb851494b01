"""HTTP client of the REST API, used by ``face-emotions submit|status|results`` and the demo.

Kept free of Flask and Celery: it only speaks the documented HTTP contract.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import requests

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = {"succeeded", "completed_with_errors", "failed", "cancelled"}
#: Characters of a job id the console and the CLI show, and the least a prefix must give.
SHORT_ID_CHARS = 8
#: The longest ``GET /api/v1/jobs/<id>?wait=`` the API accepts.
MAX_WAIT_SECONDS = 30.0
#: What a person can do about an authentication refusal, appended to the API's message.
AUTH_HINTS = {
    401: " (pass --token or set EMOTIONS_API_TOKEN; create one with "
    "`face-emotions tokens create --role submit`)",
    403: " (this token's role may not do that; admin routes need an admin token)",
}


class ApiClientError(RuntimeError):
    """The API refused the request (4xx) or can't be reached; ``user_error`` picks exit code 2."""

    def __init__(self, message: str, *, status: int | None = None, user_error: bool = True):
        super().__init__(message)
        self.status = status
        self.user_error = user_error


class EmotionsClient:
    def __init__(
        self, url: str | None = None, token: str | None = None, *, timeout: float = 60
    ) -> None:
        self.url = (url or os.environ.get("EMOTIONS_API_URL") or DEFAULT_URL).rstrip("/")
        self.token = token or os.environ.get("EMOTIONS_API_TOKEN")
        self.timeout = timeout
        self.http = requests.Session()
        if self.token:
            self.http.headers["Authorization"] = f"Bearer {self.token}"

    # -- requests ------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            response = self.http.request(
                method, f"{self.url}{path}", timeout=kwargs.pop("timeout", self.timeout), **kwargs
            )
        except requests.ConnectionError as exc:
            raise ApiClientError(
                f"cannot reach the API at {self.url} (is it running? set --url or "
                f"EMOTIONS_API_URL): {exc.__class__.__name__}"
            ) from exc
        except requests.Timeout as exc:
            raise ApiClientError(f"the API at {self.url} did not answer in time") from exc
        if response.status_code >= 400:
            hint = AUTH_HINTS.get(response.status_code, "")
            if response.status_code in (429, 503) and response.headers.get("Retry-After"):
                hint = f" (retry after {response.headers['Retry-After']} s)"
            raise ApiClientError(
                f"{method} {path} -> {response.status_code}: {_error_text(response)}{hint}",
                status=response.status_code,
                user_error=response.status_code < 500,
            )
        return response

    def submit_files(
        self,
        files: Iterable[Path | tuple[Path, str]],
        *,
        batch_size: int | None = None,
        model_version: int | None = None,
        idempotency_key: str | None = None,
        faces: str | None = None,
    ) -> dict[str, Any]:
        """Upload images (or one .zip) as one job; a ``(path, name)`` pair uploads ``path`` as
        ``name`` (a relative path such as ``Angry/0.jpg``, which the job keeps). ``faces``:
        all, largest or none (default: the server's EMOTIONS_FACES)."""
        data = _options(batch_size, model_version, faces)
        named = [item if isinstance(item, tuple) else (item, item.name) for item in files]
        with ExitStack() as stack:
            parts = [
                ("files", (name, stack.enter_context(path.open("rb")))) for path, name in named
            ]
            if not parts:
                raise ApiClientError("nothing to upload")
            return self._request(
                "POST",
                "/api/v1/jobs",
                files=parts,
                data=data,
                headers=_idempotency(idempotency_key),
                timeout=max(self.timeout, 600),
            ).json()

    def submit_folder(
        self,
        folder: str,
        *,
        recursive: bool = True,
        batch_size: int | None = None,
        model_version: int | None = None,
        idempotency_key: str | None = None,
        faces: str | None = None,
    ) -> dict[str, Any]:
        """A folder on the server's shared storage, relative to its EMOTIONS_DATA_ROOT."""
        body = {
            "folder": folder,
            "recursive": recursive,
            **_options(batch_size, model_version, faces),
        }
        return self._request(
            "POST", "/api/v1/jobs", json=body, headers=_idempotency(idempotency_key)
        ).json()

    def models(self) -> dict[str, Any]:
        """``GET /api/v1/models``: versions, the champion, and what each live worker serves."""
        return self._request("GET", "/api/v1/models").json()

    def job(self, job_id: str, *, wait: float = 0.0) -> dict[str, Any]:
        """The job; with ``wait``, the API answers once it ended or after ``wait`` seconds."""
        return self._request(
            "GET",
            f"/api/v1/jobs/{self.resolve(job_id)}",
            params={"wait": wait} if wait else None,
            timeout=self.timeout + wait,
        ).json()

    def jobs(self, *, limit: int = 20, id_prefix: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if id_prefix:
            params["id_prefix"] = id_prefix
        return self._request("GET", "/api/v1/jobs", params=params).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/api/v1/jobs/{self.resolve(job_id)}").json()

    def resolve(self, job_id: str) -> str:
        """A full job id from a unique prefix of at least 8 characters (the console and the
        CLI show 8); a full id is used as it is."""
        text = job_id.strip().lower()
        if len(text) == 36:
            return text
        if len(text.replace("-", "")) < SHORT_ID_CHARS:
            raise ApiClientError(
                f"{job_id!r}: give at least {SHORT_ID_CHARS} characters of the job id"
            )
        found = self.jobs(limit=3, id_prefix=text)
        ids = [item["id"] for item in found["items"]]
        if not ids:
            raise ApiClientError(f"no job id starts with {job_id!r}", status=404)
        if len(ids) > 1:
            raise ApiClientError(
                f"{job_id!r} is ambiguous: {found['total']} jobs start with it "
                f"({', '.join(ids[:2])}, ...); give more characters"
            )
        return ids[0]

    def results(self, job_id: str) -> list[dict[str, Any]]:
        """Every result of a job, following pagination."""
        job_id = self.resolve(job_id)
        items: list[dict[str, Any]] = []
        page = 1
        while True:
            body = self._request(
                "GET", f"/api/v1/jobs/{job_id}/results", params={"page": page, "limit": 1000}
            ).json()
            items += body["items"]
            if not body["items"] or len(items) >= body["total"]:
                return items
            page += 1

    def export(self, job_id: str, fmt: str) -> str:
        return self._request(
            "GET", f"/api/v1/jobs/{self.resolve(job_id)}/results", params={"format": fmt}
        ).text

    def wait(
        self,
        job_id: str,
        *,
        poll_seconds: float = 1.0,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Follow a job until it ends: each request waits in the API up to ``poll_seconds``
        for the end (so the end is seen at once, not up to a poll later), and answers with
        the progress so far when it did not come."""
        deadline = time.monotonic() + timeout if timeout else None
        job_id = self.resolve(job_id)
        while True:
            wait = poll_seconds
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            started = time.monotonic()
            job = self.job(job_id, wait=min(wait, MAX_WAIT_SECONDS))
            if on_progress:
                on_progress(job)
            if job["status"] in TERMINAL:
                return job
            if deadline and time.monotonic() > deadline:
                raise ApiClientError(f"job {job_id} still {job['status']} after {timeout}s")
            # An API that did not wait (an older one) must not be polled in a tight loop.
            time.sleep(max(0.0, poll_seconds - (time.monotonic() - started)))


def _options(
    batch_size: int | None, model_version: int | None, faces: str | None = None
) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if batch_size is not None:
        options["batch_size"] = batch_size
    if model_version is not None:
        options["model_version"] = model_version
    if faces is not None:
        options["faces"] = faces
    return options


def _idempotency(key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": key} if key else {}


def _error_text(response: requests.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{error['message']} ({error['code']})"
    except (ValueError, KeyError, TypeError):
        return response.text[:500] or response.reason
