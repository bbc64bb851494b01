"""API tokens: create (the plaintext is returned once), verify, list, revoke.

A token is ``fe_`` + 43 URL-safe characters from :func:`secrets.token_urlsafe` (32 random bytes,
256 bits). Only its SHA-256 is stored. A fast unsalted hash is the right tool here, unlike for
passwords: salting and slow hashes (bcrypt, argon2) exist to make guessing *low-entropy* secrets
expensive, and nobody can enumerate 2**256 candidates however fast each hash is. A fast hash
also lets every request find its token with one indexed equality lookup instead of trying a
slow hash against every row. A leaked table therefore authenticates no one, and the lookup by
hash leaks nothing useful through timing (an attacker would need a preimage to exploit it).

The module is part of the core library (no Flask): the ``face-emotions tokens`` commands and the
API's authentication both use it.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from datetime import timedelta

from sqlalchemy import or_
from sqlalchemy import select
from sqlalchemy import update
from sqlalchemy.orm import Session

from face_emotions.jobs.schema import ApiToken
from face_emotions.jobs.schema import TokenRole
from face_emotions.jobs.schema import utcnow

TOKEN_PREFIX = "fe_"
#: Characters of the token kept in clear for listings: ``fe_`` + 7 random characters.
SHOWN_PREFIX_CHARS = 10
#: ``last_used_at`` is written at most this often per token, so authentication costs a write
#: per token per minute instead of one per request (a write lock on SQLite, WAL on PostgreSQL).
TOUCH_INTERVAL = timedelta(minutes=1)
MAX_NAME_CHARS = 100
ROLES: tuple[str, ...] = tuple(role.value for role in TokenRole)


@dataclass(frozen=True)
class CreatedToken:
    """A new token row and the only copy of its plaintext; show it once, never store it."""

    token: str
    record: ApiToken


def hash_token(token: str) -> str:
    """SHA-256 hex of the full token (see the module docstring for why a fast hash is fine)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def create_token(session: Session, *, role: str, name: str = "") -> CreatedToken:
    """Insert a token with ``role`` (caller commits); the plaintext is in the result only."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of: {', '.join(ROLES)}")
    name = name.strip()
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"the name is longer than {MAX_NAME_CHARS} characters")
    token = generate_token()
    record = ApiToken(
        id=uuid.uuid4().hex[:16],
        name=name,
        role=role,
        token_hash=hash_token(token),
        prefix=token[:SHOWN_PREFIX_CHARS],
        created_at=utcnow(),
    )
    session.add(record)
    session.flush()
    return CreatedToken(token=token, record=record)


def verify_token(session: Session, token: str, *, now: datetime | None = None) -> ApiToken | None:
    """The live (not revoked) token row for ``token``, or None; records when it was used.

    ``last_used_at`` moves only when it is older than :data:`TOUCH_INTERVAL`; the conditional
    ``UPDATE`` makes concurrent requests write it once. The caller commits.
    """
    if not token.startswith(TOKEN_PREFIX):
        return None
    record = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
    if record is None or record.revoked_at is not None:
        return None
    now = now or utcnow()
    last = _aware(record.last_used_at)
    if last is None or now - last >= TOUCH_INTERVAL:
        session.execute(
            update(ApiToken)
            .where(
                ApiToken.id == record.id,
                or_(
                    ApiToken.last_used_at.is_(None),
                    ApiToken.last_used_at <= now - TOUCH_INTERVAL,
                ),
            )
            .values(last_used_at=now)
            .execution_options(synchronize_session=False)
        )
        record.last_used_at = now
    return record


def list_tokens(session: Session, *, include_revoked: bool = True) -> list[ApiToken]:
    """Every token, oldest first (no hashes are shown by callers, only ``prefix``)."""
    query = select(ApiToken).order_by(ApiToken.created_at, ApiToken.id)
    if not include_revoked:
        query = query.where(ApiToken.revoked_at.is_(None))
    return list(session.scalars(query))


def get_token(session: Session, token_id: str) -> ApiToken | None:
    return session.get(ApiToken, token_id)


def revoke_token(session: Session, token_id: str) -> ApiToken | None:
    """Revoke ``token_id`` (idempotent: a revoked token keeps its first ``revoked_at``).

    None when there is no such token. The caller commits; requests carrying the token are
    refused from the next one on, since every request looks its token up.
    """
    record = session.get(ApiToken, token_id)
    if record is None:
        return None
    if record.revoked_at is None:
        record.revoked_at = utcnow()
        session.flush()
    return record


def _aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes for timezone-aware columns; they were stored as UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)
