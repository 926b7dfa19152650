"""Reads of the site index (which blobs are verified at which site, and where to read them).

Writes go through the state owner (``datasync.transfer.state.replicas``). Two kinds of
rows (``ReplicaKind``): ``blob`` rows name the site's blob store, the only bytes a view
is built from; ``source`` rows name users' files at a registration source, read (and
hashed) as transfer sources only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import col

from datasync.db.tables import Entry
from datasync.db.transfer_tables import Replica
from datasync.models import ReplicaKind, ReplicaState

__all__ = ["BlobRow", "SiteIndex", "SourceReplica", "ViewRow", "present_at", "source_rows"]


def present_at(site: str) -> sa.Exists:
    """An ok blob-store replica of the entry's digest at ``site`` (``entries`` correlated)."""
    return (
        sa.select(sa.literal(1))
        .where(
            col(Replica.site) == site,
            col(Replica.digest) == col(Entry.digest),
            col(Replica.state) == ReplicaState.OK,
            col(Replica.kind) == ReplicaKind.BLOB,
        )
        .exists()
    )


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
_VIEW_BATCH = 1000


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


# A file of a version: path, digest, size, and its blob's ok row at a site (None: none).
ViewRow = tuple[str, str, int, BlobRow | None]


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

    def view_rows(self, version_pk: int, site: str) -> Iterator[list[ViewRow]]:
        """The files of a version in path order, a batch at a time, each with its blob's
        ok row at ``site`` (None: it has none). One streamed query: the entries' primary
        key gives the order, the replicas' primary key ``(site, digest)`` finds each row."""
        ok = sa.and_(_blob_ok(site), col(Replica.digest) == col(Entry.digest))
        query = (
            sa.select(
                col(Entry.path),
                col(Entry.digest),
                col(Entry.size),
                col(Replica.key),
                col(Replica.size),
                col(Replica.etag),
            )
            .select_from(Entry)
            .outerjoin(Replica, ok)
            .where(col(Entry.version_pk) == version_pk)
            .order_by(col(Entry.path))
        )
        last = None
        with self.engine.connect() as conn:
            result = conn.execution_options(yield_per=_VIEW_BATCH).execute(query)
            for part in result.partitions():
                batch: list[ViewRow] = []
                for path, digest, size, key, stored, etag in part:
                    if path == last:
                        continue  # a second ok row of the same blob: one is enough
                    last = path
                    row = None if key is None else BlobRow(key, int(stored), etag)
                    batch.append((path, digest, int(size), row))
                yield batch

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
