"""The site index (which blobs are verified at which site) and the chunk map of uploads.

``SiteIndex`` reads and writes ``replicas``. Invariants:

* A replica is recorded only after its bytes were verified (callers' duty; invariant 2).
  ``record`` is an upsert, so recording twice is a no-op (invariant 5) and re-verifying a
  ``bad`` replica makes it ``ok`` again.
* ``mark_bad`` keeps the row with its reason, so the planner and workers stop choosing it
  as a source and an operator can see why.

``ChunkMap`` reads and writes ``uploads`` and ``upload_parts``. Invariants:

* One in-flight chunked write per ``(site, digest)``: ``upload_for`` gets or creates its
  token atomically (``BEGIN IMMEDIATE`` on SQLite, a transaction-scoped advisory lock on
  PostgreSQL), so workers sharing a big blob all write into the same upload.
* A part is marked only after its bytes were verified and written (``put_part`` returned).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from datasync.db.engine import is_postgresql, write_transaction
from datasync.db.transfer_tables import Replica, Upload, UploadPart

__all__ = ["ChunkMap", "SiteIndex", "SourceReplica", "UploadState"]

_R: sa.Table = Replica.__table__  # type: ignore[attr-defined]
_U: sa.Table = Upload.__table__  # type: ignore[attr-defined]
_P: sa.Table = UploadPart.__table__  # type: ignore[attr-defined]


def _insert(conn: Connection, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
    return postgresql.insert(table) if is_postgresql(conn) else sqlite.insert(table)


@dataclass(frozen=True, slots=True)
class SourceReplica:
    """Where a blob can be read: ``site``'s backend, object ``key``, pinned by ``etag``."""

    site: str
    key: str
    etag: str | None
    size: int


class SiteIndex:
    """Replica bookkeeping over ``replicas``. Thread-safe (one connection per call)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def has(self, site: str, digest: str) -> bool:
        """Is ``digest`` a verified replica at ``site`` (under any key)?"""
        query = (
            sa.select(sa.literal(1))
            .where(_R.c.site == site, _R.c.digest == digest, _R.c.state == "ok")
            .limit(1)
        )
        with self.engine.connect() as conn:
            return conn.execute(query).first() is not None

    def key_for(self, site: str, digest: str) -> str | None:
        """A key at ``site`` holding verified bytes of ``digest`` (blob store key first)."""
        query = (
            sa.select(_R.c.key)
            .where(_R.c.site == site, _R.c.digest == digest, _R.c.state == "ok")
            .order_by(_R.c.key.like(".datasync/blobs/%").desc(), _R.c.key)
            .limit(1)
        )
        with self.engine.connect() as conn:
            return conn.execute(query).scalar_one_or_none()

    def record(
        self, site: str, digest: str, size: int, key: str, *, etag: str | None = None
    ) -> None:
        """Record verified bytes of ``digest`` at ``site``/``key`` (upsert, state ok)."""
        with write_transaction(self.engine) as conn:
            self.record_many(conn, site, [(digest, size, key, etag)])

    @staticmethod
    def record_many(
        conn: Connection,
        site: str,
        rows: Iterable[tuple[str, int, str, str | None]],
        *,
        verified_at: datetime | None = None,
    ) -> int:
        """Upsert ``(digest, size, key, etag)`` replicas in the caller's transaction."""
        at = verified_at or datetime.now(UTC)
        values = [
            {
                "site": site,
                "digest": d,
                "size": s,
                "key": k,
                "etag": e,
                "state": "ok",
                "verified_at": at,
                "reason": None,
            }
            for d, s, k, e in rows
        ]
        if not values:
            return 0
        stmt = _insert(conn, _R)
        stmt = stmt.on_conflict_do_update(
            index_elements=["site", "digest", "key"],
            set_={
                "size": stmt.excluded.size,
                "etag": stmt.excluded.etag,
                "state": "ok",
                "verified_at": stmt.excluded.verified_at,
                "reason": None,
            },
        )
        conn.execute(stmt, values)
        return len(values)

    def mark_bad(self, site: str, digest: str, key: str, reason: str) -> None:
        """Stop using ``site``/``key`` as a source of ``digest``; keep the reason."""
        with write_transaction(self.engine) as conn:
            conn.execute(
                sa.update(_R)
                .where(_R.c.site == site, _R.c.digest == digest, _R.c.key == key)
                .values(state="bad", reason=reason, verified_at=datetime.now(UTC))
            )

    def sources_for(self, digest: str, *, exclude_site: str | None = None) -> list[SourceReplica]:
        """Every ok replica of ``digest`` (optionally not at ``exclude_site``), by site, key."""
        query = (
            sa.select(_R.c.site, _R.c.key, _R.c.etag, _R.c.size)
            .where(_R.c.digest == digest, _R.c.state == "ok")
            .order_by(_R.c.site, _R.c.key)
        )
        if exclude_site is not None:
            query = query.where(_R.c.site != exclude_site)
        with self.engine.connect() as conn:
            return [SourceReplica(s, k, e, n) for s, k, e, n in conn.execute(query)]


@dataclass(frozen=True, slots=True)
class UploadState:
    token: str
    part_size: int
    parts_total: int


class ChunkMap:
    """In-flight chunked writes and their verified parts (resume after a kill)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def upload_for(
        self,
        site: str,
        digest: str,
        part_size: int,
        parts_total: int,
        begin: Callable[[], str],
    ) -> str:
        """The token of the upload writing ``digest`` at ``site``, starting it if needed.

        ``begin`` starts a backend write and returns its token; it runs at most once among
        all concurrent callers (under the lock). An existing upload with another part size
        is replaced (its parts forgotten): it cannot be resumed with this layout.
        """
        with write_transaction(self.engine) as conn:
            if is_postgresql(conn):
                key = int.from_bytes(
                    hashlib.blake2b(f"{site}\0{digest}".encode(), digest_size=8).digest(),
                    "big",
                    signed=True,
                )
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
            row = conn.execute(
                sa.select(_U.c.token, _U.c.part_size, _U.c.parts_total).where(
                    _U.c.site == site, _U.c.digest == digest
                )
            ).one_or_none()
            if row is not None and (row.part_size, row.parts_total) == (part_size, parts_total):
                return str(row.token)
            if row is not None:
                self._forget(conn, site, digest)
            token = begin()
            conn.execute(
                sa.insert(_U).values(
                    site=site,
                    digest=digest,
                    token=token,
                    part_size=part_size,
                    parts_total=parts_total,
                    state="open",
                    created_at=datetime.now(UTC),
                )
            )
            return token

    def current(self, site: str, digest: str) -> UploadState | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(_U.c.token, _U.c.part_size, _U.c.parts_total).where(
                    _U.c.site == site, _U.c.digest == digest
                )
            ).one_or_none()
        return None if row is None else UploadState(str(row[0]), int(row[1]), int(row[2]))

    def parts_done(self, site: str, digest: str) -> set[int]:
        query = sa.select(_P.c.idx).where(_P.c.site == site, _P.c.digest == digest)
        with self.engine.connect() as conn:
            return {int(i) for i in conn.execute(query).scalars()}

    def mark_part(self, site: str, digest: str, idx: int) -> bool:
        """Record part ``idx`` as written and verified (idempotent).

        False if the upload is gone (committed or replaced meanwhile): nothing recorded.
        """
        upload_exists = sa.exists().where(_U.c.site == site, _U.c.digest == digest)
        row = sa.select(
            sa.literal(site, sa.String), sa.literal(digest, sa.String), sa.literal(idx, sa.Integer)
        ).where(upload_exists)
        with write_transaction(self.engine) as conn:
            stmt = _insert(conn, _P).from_select(["site", "digest", "idx"], row)
            conn.execute(stmt.on_conflict_do_nothing())
            present = conn.execute(
                sa.select(sa.literal(1)).where(
                    _P.c.site == site, _P.c.digest == digest, _P.c.idx == idx
                )
            ).first()
            return present is not None

    def forget(self, site: str, digest: str) -> None:
        """Drop the upload and its parts (after commit, or to restart a stale upload)."""
        with write_transaction(self.engine) as conn:
            self._forget(conn, site, digest)

    @staticmethod
    def _forget(conn: Connection, site: str, digest: str) -> None:
        conn.execute(sa.delete(_P).where(_P.c.site == site, _P.c.digest == digest))
        conn.execute(sa.delete(_U).where(_U.c.site == site, _U.c.digest == digest))
