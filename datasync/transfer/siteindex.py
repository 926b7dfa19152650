"""Reads of the site index (which blobs are verified at which site, and where to read them).

Writes go through the state owner (``datasync.transfer.state.replicas``). Two kinds of
rows (``ReplicaKind``): ``blob`` rows name the site's blob store, the only bytes a view
is built from; ``source`` rows name users' files at a registration source, read (and
hashed) as transfer sources only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import col

from datasync.db.transfer_tables import Replica
from datasync.models import ReplicaKind, ReplicaState

__all__ = ["BlobRow", "SiteIndex", "SourceReplica", "source_rows"]


def source_rows(
    match: sa.ColumnElement[bool], dst: str, now: datetime
) -> sa.Select[str, str, str, str | None, str, str]:
    """``(digest, site, key, etag, kind, state)`` of the replicas ``match`` selects that may
    be read to bring a blob to ``dst``: ok ones, bad ones whose re-check time has come (bad
    is not forever), never ``dst``'s own blob store (what is missing there)."""
    usable = sa.or_(
        col(Replica.state) == ReplicaState.OK,
        sa.and_(col(Replica.recheck_after).is_not(None), col(Replica.recheck_after) <= now),
    )
    own = sa.and_(col(Replica.site) == dst, col(Replica.kind) == ReplicaKind.BLOB)
    return sa.select(
        col(Replica.digest),
        col(Replica.site),
        col(Replica.key),
        col(Replica.etag),
        col(Replica.kind),
        col(Replica.state),
    ).where(match, usable, sa.not_(own))


_IN_BATCH = 500


@dataclass(frozen=True, slots=True)
class SourceReplica:
    """Where a blob can be read: ``site``'s object ``key``, pinned by ``etag``."""

    site: str
    key: str
    etag: str | None
    kind: str = ReplicaKind.BLOB
    ok: bool = True  # False: a bad replica whose re-check time has come


@dataclass(frozen=True, slots=True)
class BlobRow:
    """An ok blob-store replica: its key, size and the version token seen at verification."""

    key: str
    size: int
    etag: str | None


def _blob_ok(site: str) -> sa.ColumnElement[bool]:
    return sa.and_(
        col(Replica.site) == site,
        col(Replica.state) == ReplicaState.OK,
        col(Replica.kind) == ReplicaKind.BLOB,
    )


class SiteIndex:
    """Replica reads over ``replicas``. Thread-safe (one connection per call)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def has(self, site: str, digest: str) -> bool:
        """Is ``digest`` an ok replica in ``site``'s blob store?"""
        query = sa.select(sa.literal(1)).where(_blob_ok(site), col(Replica.digest) == digest)
        with self.engine.connect() as conn:
            return conn.execute(query.limit(1)).first() is not None

    def present(self, site: str, digests: Sequence[str]) -> set[str]:
        """Which of ``digests`` are ok replicas in ``site``'s blob store (a query per 500)."""
        return set(self.blobs(site, digests))

    def blobs(self, site: str, digests: Sequence[str]) -> dict[str, BlobRow]:
        """The ok blob-store rows at ``site`` of those ``digests`` that have one."""
        found: dict[str, BlobRow] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(digests), _IN_BATCH):
                rows = conn.execute(
                    sa.select(
                        col(Replica.digest), col(Replica.key), col(Replica.size), col(Replica.etag)
                    ).where(_blob_ok(site), col(Replica.digest).in_(digests[i : i + _IN_BATCH]))
                )
                for digest, key, size, etag in rows:
                    found[digest] = BlobRow(key, int(size), etag)
        return found

    def sources_for(
        self, digest: str, *, dst: str, now: datetime | None = None
    ) -> list[SourceReplica]:
        """Every replica of ``digest`` that may be read to bring it to ``dst``: ok ones,
        then bad ones whose re-check time has come; never ``dst``'s own blob store."""
        return self.sources_for_many([digest], dst=dst, now=now).get(digest, [])

    def sources_for_many(
        self, digests: Sequence[str], *, dst: str, now: datetime | None = None
    ) -> dict[str, list[SourceReplica]]:
        """``sources_for`` of each of ``digests`` (one query per 500; a digest with no
        usable replica is absent). A batch of small blobs asks once, not once per blob."""
        now = now or datetime.now(UTC)
        found: dict[str, list[SourceReplica]] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(digests), _IN_BATCH):
                batch = col(Replica.digest).in_(digests[i : i + _IN_BATCH])
                query = source_rows(batch, dst, now).order_by(
                    col(Replica.digest), col(Replica.site), col(Replica.key)
                )
                for digest, site, key, etag, kind, state in conn.execute(query):
                    found.setdefault(digest, []).append(
                        SourceReplica(site, key, etag, kind, state == ReplicaState.OK)
                    )
        # Bad ones last, stable by site, key.
        return {d: sorted(rows, key=lambda r: not r.ok) for d, rows in found.items()}
