"""API tokens: issued once, stored as sha256, resolved to a ``Principal`` per request.

* A token is ``secrets.token_urlsafe(32)`` (256 random bits). It is returned once, by
  ``create``, and never stored, logged or printed again: the ``api_tokens`` table keeps its
  sha256 hex, looked up by that hash and compared in constant time.
* Revoked and expired tokens authenticate as nobody (``Unauthorized``).
* The embedded default: ``ensure_admin`` creates an admin token when no usable one exists
  and writes it to ``$DATASYNC_HOME/admin.token`` with mode 0600 (the file is written
  before the row is committed and renamed into place after, so a token in the database
  always has its file, and a crash leaves at most a stray temporary file).
* ``last_used_at`` is refreshed at most once a minute per token, off the request path:
  on SQLite a long registration holds the write lock, and no request may wait for it.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from pydantic import BaseModel, Field
from sqlalchemy.engine import Engine
from sqlmodel import col

from datasync.auth.roles import Principal, Role, Unauthorized, check_namespaces
from datasync.db.ops_tables import ApiToken
from datasync.errors import UnknownReference, UserError

__all__ = [
    "ADMIN_TOKEN_FILE",
    "IssuedToken",
    "TokenExists",
    "TokenInfo",
    "TokenService",
    "check_token_name",
    "hash_token",
    "parse_expiry",
    "read_token_file",
    "write_private",
]

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin.token"
TOKEN_BYTES = 32
_MAX_TOKEN_CHARS = 256  # far above a token_urlsafe(32); longer input is not worth hashing
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TOUCH_EVERY_SECONDS = 60.0


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands timestamps back without their zone; they were written in UTC.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


class TokenExists(UserError):
    """A token of that name exists already (HTTP 409)."""


class TokenInfo(BaseModel):
    """What ``datasync token list`` shows: never the token, never its hash."""

    name: str
    role: Role
    namespaces: list[str]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    state: str  # active | expired | revoked

    @classmethod
    def of(cls, row: ApiToken, now: datetime) -> TokenInfo:
        expires = _aware(row.expires_at)
        revoked = _aware(row.revoked_at)
        state = "revoked" if revoked else "expired" if expires and expires <= now else "active"
        return cls(
            name=row.name,
            role=Role(row.role),
            namespaces=list(row.namespaces),
            created_at=_aware(row.created_at) or now,
            expires_at=expires,
            revoked_at=revoked,
            last_used_at=_aware(row.last_used_at),
            state=state,
        )


class IssuedToken(TokenInfo):
    """A token just created: the only time the secret is in hand."""

    token: str = Field(repr=False)


class TokenService:
    """Create, list, revoke and authenticate API tokens. Built by ``bootstrap``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._touched: dict[int, float] = {}
        self._lock = threading.Lock()
        self._toucher = cf.ThreadPoolExecutor(1, thread_name_prefix="datasync-token-touch")

    # ------------------------------------------------------------ management

    def create(
        self,
        name: str,
        role: Role | str,
        namespaces: Iterable[str] = (),
        *,
        expires_at: datetime | None = None,
    ) -> IssuedToken:
        """Issue a token. Raises ``UserError`` for a bad or taken name, role or namespace."""
        return self._issue(name, role, namespaces, expires_at, secrets.token_urlsafe(TOKEN_BYTES))

    def _issue(
        self,
        name: str,
        role: Role | str,
        namespaces: Iterable[str],
        expires_at: datetime | None,
        secret: str,
    ) -> IssuedToken:
        role = _role(role)
        spaces = check_namespaces(role, namespaces)
        check_token_name(name)
        now = datetime.now(UTC)
        expires_at = _aware(expires_at)
        if expires_at is not None and expires_at <= now:
            raise UserError(f"expiry {expires_at.isoformat()} is in the past")
        row = ApiToken(
            name=name,
            token_hash=hash_token(secret),
            role=role.value,
            namespaces=list(spaces),
            created_at=now,
            expires_at=expires_at,
        )
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.insert(ApiToken).values(**row.model_dump(exclude={"id"})))
        except sa.exc.IntegrityError as exc:
            raise TokenExists(f"a token named {name!r} exists already") from exc
        return IssuedToken(**TokenInfo.of(row, now).model_dump(), token=secret)

    def list(self) -> list[TokenInfo]:
        now = datetime.now(UTC)
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(ApiToken).order_by(col(ApiToken.name))).all()
        return [TokenInfo.of(ApiToken.model_validate(r._mapping), now) for r in rows]

    def revoke(self, name: str) -> TokenInfo:
        """Revoke ``name`` (idempotent: a revoked token keeps its first revocation time)."""
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(ApiToken)
                .where(col(ApiToken.name) == name, col(ApiToken.revoked_at).is_(None))
                .values(revoked_at=now)
            )
            row = conn.execute(sa.select(ApiToken).where(col(ApiToken.name) == name)).first()
        if row is None:
            raise UnknownReference(f"no token named {name!r}")
        return TokenInfo.of(ApiToken.model_validate(row._mapping), now)

    # ------------------------------------------------------------ authentication

    def authenticate(self, token: str) -> Principal:
        """The caller ``token`` stands for; ``Unauthorized`` if it is unknown, revoked or
        expired. The message never repeats the token."""
        if not token or len(token) > _MAX_TOKEN_CHARS:
            raise Unauthorized("invalid token")
        digest = hash_token(token)
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.select(ApiToken).where(col(ApiToken.token_hash) == digest)
            ).first()
        row = ApiToken.model_validate(found._mapping) if found is not None else None
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            raise Unauthorized("invalid token")
        now = datetime.now(UTC)
        if row.revoked_at is not None:
            raise Unauthorized(f"token {row.name!r} was revoked")
        expires = _aware(row.expires_at)
        if expires is not None and expires <= now:
            raise Unauthorized(f"token {row.name!r} expired at {expires.isoformat()}")
        if row.id is not None:
            self._touch(row.id, now)
        return Principal(row.name, Role(row.role), frozenset(row.namespaces))

    def _touch(self, token_id: int, now: datetime) -> None:
        tick = time.monotonic()
        with self._lock:
            last = self._touched.get(token_id)
            if last is not None and tick - last < _TOUCH_EVERY_SECONDS:
                return
            self._touched[token_id] = tick
        with contextlib.suppress(RuntimeError):  # shut down: the process is stopping
            self._toucher.submit(self._write_last_used, token_id, now)

    def _write_last_used(self, token_id: int, now: datetime) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    sa.update(ApiToken).where(col(ApiToken.id) == token_id).values(last_used_at=now)
                )
        except sa.exc.SQLAlchemyError as exc:  # bookkeeping only: never fail a request
            log.debug("could not record the last use of token %d: %s", token_id, type(exc))

    # ------------------------------------------------------------ embedded admin

    def has_active_admin(self) -> bool:
        return any(t.role is Role.ADMIN and t.state == "active" for t in self.list())

    def ensure_admin(self, home: Path) -> Path | None:
        """Create the embedded admin token if no active admin token exists.

        Returns the file it was written to (``home/admin.token``, mode 0600), or None when
        an admin token exists already (its file, if any, is left alone).
        """
        if self.has_active_admin():
            return None
        home.mkdir(parents=True, exist_ok=True)
        path = home / ADMIN_TOKEN_FILE
        taken = {t.name for t in self.list()}
        name = "admin" if "admin" not in taken else f"admin-{secrets.token_hex(3)}"
        secret = secrets.token_urlsafe(TOKEN_BYTES)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write_private(tmp, secret + "\n")
        try:
            self._issue(name, Role.ADMIN, (), None, secret)
        except UserError:
            tmp.unlink(missing_ok=True)
            # Another process created one at the same instant (names are unique).
            if self.has_active_admin():
                return None
            raise
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        self._toucher.shutdown(wait=True)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600, whatever the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask said
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_token_file(path: Path) -> str:
    """The token in ``path`` (as written by ``ensure_admin`` or ``token create -o``)."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UserError(f"cannot read token file {path}: {exc.strerror}") from exc


def parse_expiry(text: str | None) -> datetime | None:
    """``+30d`` or ISO 8601, written as deadlines are; None for no expiry."""
    from datasync.transfer.status import parse_deadline  # the one spelling of a time

    try:
        expiry = parse_deadline(text)
        # In UTC now: past year 9999 there, PostgreSQL would store what no read can return.
        return expiry.astimezone(UTC) if expiry is not None else None
    except OverflowError:
        raise UserError(f"expiry {text!r} is out of range") from None


def _role(role: Role | str) -> Role:
    try:
        return Role(role)
    except ValueError:
        known = ", ".join(r.value for r in Role)
        raise UserError(f"unknown role {role!r}: use one of {known}") from None


def check_token_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise UserError(
            f"invalid token name {name!r}: up to 128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
