"""Who is calling, and what they may do: API tokens sent as ``Authorization: Bearer <token>``.

Credentials:

- database tokens (``face-emotions tokens create --role submit|admin``), looked up by their
  SHA-256 (:mod:`face_emotions.jobs.tokens`); the principal's id is the token's id, which
  jobs record as their owner;
- the bootstrap ``EMOTIONS_ADMIN_TOKEN``, an admin with id ``admin``, so a fresh deployment
  can be driven before any token exists (compared with :func:`hmac.compare_digest`, so the
  time a refusal takes does not tell how much of a guess was right);
- ``EMOTIONS_AUTH=disabled`` (local demo only): every request is an admin with owner ``""``.

Roles: ``submit`` creates jobs and reads its own; ``admin`` reads every job, trains and
promotes. Refusals: no or unknown token -> 401 ``unauthorized`` with ``WWW-Authenticate:
Bearer``; a valid token without the role -> 403 ``forbidden``; another token's job -> 404
(views filter by owner, so its existence is not revealed). Error bodies and logs never contain
the token.

The principal is resolved lazily, once per request, by :func:`current_principal`; views declare
what they need with :func:`require_role`, placed right under the route decorator so that the
check runs before the body is parsed (a caller without a token learns nothing about what a
valid request looks like).
"""

from __future__ import annotations

import functools
import hmac
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from typing import TypeVar

from flask import g
from flask import request

from api.errors import ApiError
from api.extensions import services
from face_emotions.jobs import tokens as db_tokens
from face_emotions.settings import Settings

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

SUBMIT = "submit"
ADMIN = "admin"
#: Which roles satisfy a requirement: admin can do everything submit can.
ROLE_GRANTS: dict[str, frozenset[str]] = {
    SUBMIT: frozenset({SUBMIT, ADMIN}),
    ADMIN: frozenset({ADMIN}),
}
#: Owner id of the bootstrap admin token's jobs and training runs.
BOOTSTRAP_ID = "admin"
#: Owner of everything created while authentication is disabled (the jobs' column default).
ANONYMOUS_ID = ""
_PRINCIPAL = "_face_emotions_principal"
_REQUIRED_ROLE = "_face_emotions_required_role"

DISABLED_WARNING = """\
################################################################################
WARNING: API AUTHENTICATION IS DISABLED (EMOTIONS_AUTH=disabled).
Anyone who can reach this port can submit jobs, read the results of EVERY job,
start training runs and promote models. Use this only for a local demo bound
to 127.0.0.1. Unset EMOTIONS_AUTH and create tokens with
`face-emotions tokens create --role submit|admin` for anything else.
################################################################################"""


@dataclass(frozen=True)
class Principal:
    """The caller as far as authorisation is concerned.

    ``id`` is the owner recorded on jobs (token id, ``admin`` for the bootstrap token, ``""``
    with auth disabled); ``name`` is for people (a token's ``--name``).
    """

    id: str
    role: str
    name: str

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    @property
    def owner_filter(self) -> str | None:
        """The owner to restrict reads to; None (every owner) for admins."""
        return None if self.is_admin else self.id

    def allows(self, role: str) -> bool:
        return self.role in ROLE_GRANTS[role]


ANONYMOUS_ADMIN = Principal(id=ANONYMOUS_ID, role=ADMIN, name="anonymous (auth disabled)")
BOOTSTRAP_ADMIN = Principal(id=BOOTSTRAP_ID, role=ADMIN, name="bootstrap admin token")


def authenticate(settings: Settings, authorization: str | None) -> Principal:
    """The principal behind an ``Authorization`` header value, or a 401 :class:`ApiError`."""
    if settings.auth == "disabled":
        return ANONYMOUS_ADMIN
    token = _bearer_token(authorization)
    if token is None:
        raise _unauthorized(
            "this route needs an API token: send 'Authorization: Bearer <token>'", invalid=False
        )
    expected = settings.admin_token
    if expected and hmac.compare_digest(token.encode(), expected.encode()):
        return BOOTSTRAP_ADMIN
    record = _verify_database_token(token)
    if record is None:
        raise _unauthorized("invalid or revoked token", invalid=True)
    return Principal(id=record.id, role=record.role, name=record.name or record.id)


def current_principal() -> Principal:
    """Who is calling; resolved from the request on first use, then cached for the request.

    Raises the 401 :class:`ApiError` when the request carries no valid credential.
    """
    principal = g.get(_PRINCIPAL)
    if principal is None:
        principal = authenticate(services().settings, request.headers.get("Authorization"))
        setattr(g, _PRINCIPAL, principal)
    return principal


def optional_principal() -> Principal | None:
    """The caller if the request authenticates, else None; never raises (rate-limit keys)."""
    try:
        return current_principal()
    except ApiError:
        return None


def require_role(role: str) -> Callable[[F], F]:
    """Refuse the request unless its principal holds ``role`` (``submit`` admits admins too).

    Put it right under the route decorator (``@bp.post(...)``), above ``@bp.input``: the check
    then runs before the body is parsed.
    """
    if role not in ROLE_GRANTS:
        raise ValueError(f"unknown role {role!r}")

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            principal = current_principal()
            if not principal.allows(role):
                raise ApiError(403, "forbidden", f"this route needs a token with the {role} role")
            return view(*args, **kwargs)

        setattr(wrapper, _REQUIRED_ROLE, role)
        return wrapper  # type: ignore[return-value]

    return decorator


def required_role(view: Callable[..., Any]) -> str | None:
    """The role :func:`require_role` put on ``view`` (through APIFlask's wrappers), or None."""
    seen: set[int] = set()
    current: Any = view
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        role = getattr(current, _REQUIRED_ROLE, None)
        if role is not None:
            return role
        current = getattr(current, "__wrapped__", None)
    return None


def warn_if_disabled(settings: Settings) -> None:
    """Start-up warning for ``EMOTIONS_AUTH=disabled``: logged and printed to stderr.

    Printed as well as logged because a demo often runs without logging configured, and this
    is the one line an operator must not miss.
    """
    if settings.auth != "disabled":
        return
    log.warning("%s", DISABLED_WARNING)
    print(DISABLED_WARNING, file=sys.stderr, flush=True)


def _verify_database_token(token: str) -> Any:
    """Look the token up in its own short session and commit the ``last_used_at`` touch.

    A separate session keeps the authentication write out of the view's transaction.
    """
    if not token.startswith(db_tokens.TOKEN_PREFIX):
        return None
    with services().sessions() as session:
        record = db_tokens.verify_token(session, token)
        if record is not None:
            session.commit()
            session.expunge(record)
        return record


def _unauthorized(message: str, *, invalid: bool) -> ApiError:
    challenge = 'Bearer realm="face-emotions"'
    if invalid:
        challenge += ', error="invalid_token"'
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": challenge})


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token
