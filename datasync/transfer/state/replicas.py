"""Replica transitions: the site index's writes.

Invariants:

* A ``blob`` replica is recorded only after its bytes were re-read and verified in the
  site's blob store (the callers' duty, invariant 2). ``record`` is an upsert, so
  recording twice is a no-op (invariant 5), and re-verified bytes make a ``bad`` row
  ``ok`` again.
* ``source`` replicas name users' files at a registration source. They are recorded
  ``ok`` without reading them (the registration just hashed them, or an operator named
  them with ``--from``); every transfer hashes what it reads from them anyway, so they
  are only ever hints for choosing a source.
* ``mark_bad`` keeps the row with its reason and a time after which it is tried again,
  last: bad is not forever (a restored source file works again without any command).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import col

from datasync.db.tables import Entry
from datasync.db.transfer_tables import Replica
from datasync.events import BlobReplicated, ReplicaMarkedBad
from datasync.models import ReplicaKind, ReplicaState
from datasync.transfer.state._core import StateBase, Txn

__all__ = ["DEFAULT_RECHECK", "ReplicaRow", "ReplicaStates"]

# How long a bad replica is passed over before it is tried again (as a last resort).
DEFAULT_RECHECK = timedelta(minutes=15)


class ReplicaRow(NamedTuple):
    digest: str
    size: int
    key: str
    etag: str | None


def _insert(txn: Txn) -> Any:
    return postgresql.insert(Replica) if txn.pg else sqlite.insert(Replica)


class ReplicaStates(StateBase):
    """Every write to ``replicas``."""

    def record(
        self, site: str, rows: Iterable[ReplicaRow], *, kind: ReplicaKind = ReplicaKind.BLOB
    ) -> int:
        """Upsert verified replicas (state ok) in one transaction; returns how many."""
        with self._write() as txn:
            return self.record_in(txn, site, rows, kind=kind)

    @staticmethod
    def record_in(txn: Txn, site: str, rows: Iterable[ReplicaRow], *, kind: ReplicaKind) -> int:
        recorded = list(rows)
        values = [
            {
                "site": site,
                "digest": r.digest,
                "size": r.size,
                "key": r.key,
                "kind": kind,
                "etag": r.etag,
                "state": ReplicaState.OK,
                "verified_at": txn.now,
                "reason": None,
                "recheck_after": None,
            }
            for r in recorded
        ]
        if not values:
            return 0
        stmt = _insert(txn)
        stmt = stmt.on_conflict_do_update(
            index_elements=["site", "digest", "key"],
            set_={
                "size": stmt.excluded.size,
                "etag": stmt.excluded.etag,
                "kind": stmt.excluded.kind,
                "state": ReplicaState.OK,
                "verified_at": stmt.excluded.verified_at,
                "reason": None,
                "recheck_after": None,
            },
        )
        txn.conn.execute(stmt, values)
        if kind is ReplicaKind.BLOB:
            for r in recorded:
                txn.emit(BlobReplicated(site=site, digest=r.digest, size=r.size))
        return len(values)

    def record_sources(self, site: str, prefix: str, version_pk: int, *, refresh: bool) -> int:
        """Record every file of the version as a ``source`` replica at ``site``/``prefix``.

        One ``INSERT ... SELECT`` (no Python-side rows). ``refresh`` also turns existing
        rows back to ok: the files were just hashed (a registration) or an operator named
        them (``--from``), and every transfer hashes what it reads anyway. Returns the
        number of rows inserted or refreshed."""
        with self._write() as txn:
            key = col(Entry.path) if not prefix else sa.literal(prefix, sa.Text) + col(Entry.path)
            rows = sa.select(
                sa.literal(site, sa.String),
                col(Entry.digest),
                col(Entry.size),
                key,
                sa.literal(ReplicaKind.SOURCE, sa.String),
                sa.literal(ReplicaState.OK, sa.String),
                sa.literal(txn.now, sa.DateTime(timezone=True)),
            ).where(col(Entry.version_pk) == version_pk)
            stmt = _insert(txn).from_select(
                ["site", "digest", "size", "key", "kind", "state", "verified_at"], rows
            )
            if refresh:
                stmt = stmt.on_conflict_do_update(
                    index_elements=["site", "digest", "key"],
                    set_={
                        "state": ReplicaState.OK,
                        "reason": None,
                        "recheck_after": None,
                        "verified_at": stmt.excluded.verified_at,
                    },
                    where=col(Replica.kind) == ReplicaKind.SOURCE,
                )
            else:
                stmt = stmt.on_conflict_do_nothing()
            # Without preserve_rowcount SQLAlchemy (2.x, psycopg) drops the rowcount of an
            # INSERT ... SELECT ... ON CONFLICT and PostgreSQL reads 0.
            result = txn.conn.execute(stmt, execution_options={"preserve_rowcount": True})
            return max(0, result.rowcount or 0)

    def mark_bad(
        self,
        site: str,
        digest: str,
        key: str,
        reason: str,
        *,
        recheck_in: timedelta = DEFAULT_RECHECK,
    ) -> None:
        """Stop trusting ``site``/``key`` for ``digest`` until re-verified; keep the reason."""
        with self._write() as txn:
            found = txn.conn.execute(
                sa.update(Replica)
                .where(
                    col(Replica.site) == site,
                    col(Replica.digest) == digest,
                    col(Replica.key) == key,
                )
                .values(
                    state=ReplicaState.BAD,
                    reason=reason,
                    verified_at=txn.now,
                    recheck_after=txn.now + recheck_in,
                )
                .returning(col(Replica.kind))
            ).scalar_one_or_none()
            if found is not None:
                txn.emit(
                    ReplicaMarkedBad(site=site, digest=digest, key=key, kind=found, reason=reason)
                )

    def forget_blobs(self, site: str, digests: list[str]) -> int:
        """Drop the blob-store rows of ``digests`` at ``site`` (their objects were deleted to
        make room). Returns how many rows went."""
        if not digests:
            return 0
        with self._write() as txn:
            gone = txn.conn.execute(
                sa.delete(Replica).where(
                    col(Replica.site) == site,
                    col(Replica.kind) == ReplicaKind.BLOB,
                    col(Replica.digest).in_(digests),
                )
            )
            return int(gone.rowcount or 0)

    def restore(self, site: str, digest: str, key: str) -> bool:
        """A bad source read back the right bytes again: ok once more. True if it was bad."""
        with self._write() as txn:
            hit = txn.conn.execute(
                sa.update(Replica)
                .where(
                    col(Replica.site) == site,
                    col(Replica.digest) == digest,
                    col(Replica.key) == key,
                    col(Replica.state) == ReplicaState.BAD,
                )
                .values(state=ReplicaState.OK, reason=None, recheck_after=None, verified_at=txn.now)
            )
            return bool(hit.rowcount)
