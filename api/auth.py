"""Who may call the admin routes (training runs, promotion): bearer tokens.

Today there is one credential, the bootstrap admin token ``EMOTIONS_ADMIN_TOKEN``. Everything
about authentication lives in this module (parsing the header, comparing tokens, the error
shapes, the OpenAPI scheme) so that database-stored tokens with roles can replace
:func:`authenticate` later without touching the views.

Refusals: no token configured -> 403 ``admin_disabled`` (the server, not the client, must
change); a missing or wrong token -> 401 ``unauthorized`` with ``WWW-Authenticate: Bearer``.
Tokens are compared with :func:`hmac.compare_digest`, so the time a refusal takes does not
tell how much of a guess was right.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import g, request
from flask.blueprints import BlueprintSetupState

from api.errors import ApiError
from api.extensions import services
from api.schemas import ErrorOut
from human_face_emotions.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

#: Name of the OpenAPI security scheme; views pass it to ``@bp.doc(security=...)``.
SECURITY_SCHEME = "bearerAuth"
BEARER_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "The admin token (EMOTIONS_ADMIN_TOKEN): `Authorization: Bearer <token>`.",
}
ADMIN = "admin"
_PRINCIPAL = "_face_emotions_principal"

#: OpenAPI responses every admin route can give, for ``@bp.doc(responses=...)``.
AUTH_RESPONSES: dict[int, dict[str, Any]] = {
    401: {
        "description": "Missing or invalid bearer token",
        "content": {"application/json": {"schema": ErrorOut}},
    },
    403: {
        "description": "Admin routes are disabled (no EMOTIONS_ADMIN_TOKEN on the server)",
        "content": {"application/json": {"schema": ErrorOut}},
    },
}


@dataclass(frozen=True)
class Principal:
    """The caller, as far as authorisation is concerned."""

    name: str
    role: str


def authenticate(settings: Settings, authorization: str | None) -> Principal:
    """The principal behind an ``Authorization`` header value, or an :class:`ApiError`."""
    expected = settings.admin_token
    if not expected:
        raise ApiError(
            403,
            "admin_disabled",
            "admin routes are disabled on this server; set EMOTIONS_ADMIN_TOKEN to enable them",
        )
    token = _bearer_token(authorization)
    if token is None:
        raise ApiError(
            401,
            "unauthorized",
            "this route needs an admin token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": 'Bearer realm="face-emotions"'},
        )
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise ApiError(
            401,
            "unauthorized",
            "invalid token",
            headers={"WWW-Authenticate": 'Bearer realm="face-emotions", error="invalid_token"'},
        )
    return Principal(name=ADMIN, role=ADMIN)


def require_admin(view: F) -> F:
    """Refuse the request unless it carries the admin token.

    Put it right under the route decorator (``@bp.post(...)``), above ``@bp.input``: the
    check then runs before the body is parsed, so a caller without a token learns nothing
    about what a valid request looks like.
    """

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        principal = authenticate(services().settings, request.headers.get("Authorization"))
        setattr(g, _PRINCIPAL, principal)
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def current_principal() -> Principal | None:
    """Who :func:`require_admin` let in for this request (None outside admin routes)."""
    return g.get(_PRINCIPAL)


def register_security_scheme(state: BlueprintSetupState) -> None:
    """``bp.record_once`` callback: document the bearer scheme on the app that registers us."""
    app = state.app
    schemes = dict(app.config.get("SECURITY_SCHEMES") or {})
    schemes.setdefault(SECURITY_SCHEME, BEARER_SCHEME)
    app.config["SECURITY_SCHEMES"] = schemes


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token
