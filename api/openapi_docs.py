"""What the OpenAPI document says that APIFlask cannot infer from the views.

- :func:`error_responses` builds the error entries of ``@bp.doc(responses=...)`` for any
  route: every error body is an ``ErrorOut``, so a route only names its status codes and what
  they mean there (plus which ones carry ``Retry-After``, and whether 401/403 are listed).
- Job submission and results, whose successes come in more than one content type, have their
  responses written out here (:data:`SUBMISSION_RESPONSES`, :data:`RESULTS_RESPONSES`).
- :func:`process_spec`, registered with the public ``app.spec_processor``, edits the finished
  document: the bearer scheme (and 401/403) on every ``/api/`` operation, the two request
  bodies of job submission, and what the URL converters accept.

The submission bodies are written by the spec processor rather than declared on the view
because the view parses multipart *or* JSON itself (``@bp.input`` parses a single location and
would reject the other), and APIFlask has no public decorator that documents a body without
parsing it. The processor writes the whole ``requestBody``, so no private APIFlask function
(formerly ``apiflask.scaffold._annotate``) is needed.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from collections.abc import Mapping
from typing import Any
from typing import TypeAlias

from apiflask import APIFlask

from api.job_requests import MULTIPART
from api.schemas.common import MAX_INT32
from api.schemas.common import ErrorOut
from api.schemas.jobs import MAX_BATCH_SIZE
from face_emotions.faces.crop import FACE_POLICIES

#: What ``@bp.doc(responses=...)`` takes as response objects (APIFlask's ``ResponsesObjectType``:
#: its keys are ``int | str`` and a dict is invariant in them, so ``dict[int, ...]`` won't do).
Responses: TypeAlias = dict[int | str, dict[str, Any]]

#: Name of the OpenAPI security scheme.
SECURITY_SCHEME = "bearerAuth"
BEARER_SCHEME: dict[str, str] = {
    "type": "http",
    "scheme": "bearer",
    "description": "An API token (`face-emotions tokens create --role submit|admin`) or the "
    "bootstrap EMOTIONS_ADMIN_TOKEN: `Authorization: Bearer <token>`.",
}
#: The refusals of :func:`api.auth.require_role`, which every protected route can give.
AUTH_ERRORS: dict[int, str] = {
    401: "Missing, unknown or revoked bearer token",
    403: "The token's role may not do this",
}
RETRY_AFTER_HEADER: dict[str, Any] = {
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "schema": {"type": "integer"},
    }
}
HTTP_METHODS: frozenset[str] = frozenset({"get", "post", "put", "patch", "delete"})
#: ``<converter(args):name>`` in a Werkzeug rule.
_VARIABLE = re.compile(r"<(?:(?P<converter>[A-Za-z_]\w*)(?:\([^)]*\))?:)?(?P<name>\w+)>")
#: What the converters our routes use accept (``int`` is unsigned unless told otherwise).
CONVERTER_SCHEMAS: dict[str, dict[str, Any]] = {
    "uuid": {"type": "string", "format": "uuid"},
    "int": {"type": "integer", "minimum": 0},
}


def schema_ref(name: str) -> dict[str, str]:
    """A reference to a registered component, for content that names an output schema
    without making APIFlask register it a second time (as ``JobOut1``)."""
    return {"$ref": f"#/components/schemas/{name}"}


def response_doc(
    description: str,
    content: Mapping[str, Any] | None = None,
    *,
    headers: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One entry of ``@bp.doc(responses=...)``; ``content`` maps media types to schemas."""
    doc: dict[str, Any] = {"description": description}
    if content is not None:
        doc["content"] = {media: {"schema": schema} for media, schema in content.items()}
    if headers is not None:
        doc["headers"] = dict(headers)
    return doc


def error_responses(
    descriptions: Mapping[int, str],
    *,
    retry_after: Collection[int] = (),
    auth: bool = False,
) -> Responses:
    """Error entries for ``@bp.doc(responses=...)``: one ``ErrorOut`` body per status code.

    ``retry_after``: the codes whose refusals carry a ``Retry-After`` header. ``auth`` adds the
    401/403 of :data:`AUTH_ERRORS` (:func:`document_security` adds them to routes that do not).
    """
    codes = {**AUTH_ERRORS, **descriptions} if auth else dict(descriptions)
    return {
        code: response_doc(
            description,
            {"application/json": ErrorOut},
            headers=RETRY_AFTER_HEADER if code in retry_after else None,
        )
        for code, description in codes.items()
    }


# -- /api/v1/jobs: responses with more than an error body ---------------------------------

JOB_NOT_FOUND: dict[int, str] = {404: "Job not found"}
SUBMISSION_RESPONSES: Responses = {
    200: response_doc(
        "A job with this Idempotency-Key already exists: it is returned and nothing new is "
        "stored or queued",
        {"application/json": schema_ref("JobOut")},
    ),
    **error_responses(
        {
            400: "Invalid input",
            413: "Request body too large",
            415: "Unsupported content type",
            429: "Too many submissions for this token; see Retry-After",
            503: "Too many images are waiting (back-pressure); see Retry-After",
        },
        retry_after=(429, 503),
    ),
}
#: One route, two kinds of success: a JSON page, or every result as a streamed download.
RESULTS_RESPONSES: Responses = {
    200: response_doc(
        "format=json: one page of results. format=jsonl or csv: every result, streamed as "
        "an attachment",
        {
            "application/json": schema_ref("ResultPageOut"),
            "application/x-ndjson": {"type": "string"},
            "text/csv": {"type": "string"},
        },
    ),
    **error_responses({400: "Invalid input", **JOB_NOT_FOUND}),
}


# -- spec processing -----------------------------------------------------------------------


def process_spec(app: APIFlask, spec: dict[str, Any]) -> dict[str, Any]:
    """The app's spec processor: security on every /api/ route, the two request bodies of
    job submission, and what the URL converters accept."""
    spec = document_security(spec)
    spec = document_request_bodies(spec)
    return document_path_converters(app, spec)


def document_security(spec: dict[str, Any]) -> dict[str, Any]:
    """Every ``/api/`` operation needs the bearer scheme.

    Done on the finished spec rather than per view so that a new route cannot be forgotten;
    the 401/403 responses are added where a view did not document them itself.
    """
    components = spec.setdefault("components", {})
    components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = dict(BEARER_SCHEME)
    for path, operations in spec.get("paths", {}).items():
        if not path.startswith("/api/"):
            continue
        for method, operation in operations.items():
            if method not in HTTP_METHODS:
                continue
            operation["security"] = [{SECURITY_SCHEME: []}]
            responses = operation.setdefault("responses", {})
            for status, description in AUTH_ERRORS.items():
                responses.setdefault(
                    str(status),
                    response_doc(description, {"application/json": schema_ref("ErrorOut")}),
                )
    return spec


def document_request_bodies(spec: dict[str, Any]) -> dict[str, Any]:
    """One precise request schema per content type of ``POST /api/v1/jobs``.

    A single schema for both content types would tell clients (and fuzzers) that JSON takes
    ``files`` and multipart takes ``folder``. The two bodies are written here from the same
    constants the validating schemas use; a unit test keeps their field names in step with
    :class:`~api.schemas.jobs.JobFolderIn` and :class:`~api.schemas.jobs.JobUploadForm`.
    """
    post = spec.get("paths", {}).get("/api/v1/jobs", {}).get("post")
    if post is None:
        return spec
    batch_size = {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_BATCH_SIZE,
        "description": "Images per forward pass (default EMOTIONS_BATCH_SIZE).",
    }
    model_version = {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_INT32,
        "description": "Pin a registered version; default: the serving alias.",
    }
    faces = {
        "type": "string",
        "enum": list(FACE_POLICIES),
        "description": "all: classify every face; largest: the largest face only; none: the "
        "whole image, no detection. Default EMOTIONS_FACES (all).",
    }
    content = post.setdefault("requestBody", {}).setdefault("content", {})
    content[MULTIPART] = {
        "schema": {
            "type": "object",
            "required": ["files"],
            "properties": {
                "files": {
                    "type": "array",
                    "items": {"type": "string", "format": "binary"},
                    "description": "Images (.png, .jpg...) or exactly one .zip of images.",
                },
                "batch_size": batch_size,
                "model_version": model_version,
                "faces": faces,
            },
        }
    }
    content["application/json"] = {
        "schema": {
            "type": "object",
            "required": ["folder"],
            "additionalProperties": False,
            "properties": {
                "folder": {
                    "type": "string",
                    "example": "faces",
                    "description": "Folder relative to EMOTIONS_DATA_ROOT on the server.",
                },
                "recursive": {
                    "type": "boolean",
                    "default": True,
                    "description": "Include sub-folders.",
                },
                "batch_size": batch_size,
                "model_version": {**model_version, "nullable": True},
                "faces": faces,
            },
        }
    }
    return spec


def document_path_converters(app: APIFlask, spec: dict[str, Any]) -> dict[str, Any]:
    """Say in the spec what the URL converters accept (``uuid`` ids, non-negative integers).

    APIFlask documents every path parameter as a plain string or integer; clients and
    fuzzers that read the spec then build URLs that cannot match any route.
    """
    formats: dict[tuple[str, str], dict[str, Any]] = {}
    for rule in app.url_map.iter_rules():
        path = _VARIABLE.sub(lambda m: "{" + m["name"] + "}", rule.rule)
        for match in _VARIABLE.finditer(rule.rule):
            schema = CONVERTER_SCHEMAS.get(match["converter"] or "")
            if schema is not None:
                formats[(path, match["name"])] = schema
    for path, operations in spec.get("paths", {}).items():
        for operation in operations.values():
            if not isinstance(operation, dict):
                continue
            for parameter in operation.get("parameters", []):
                schema = formats.get((path, parameter.get("name", "")))
                if parameter.get("in") == "path" and schema is not None:
                    parameter["schema"] = dict(schema)
    return spec
