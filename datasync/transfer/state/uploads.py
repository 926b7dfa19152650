"""The chunk map: in-flight chunked writes of large blobs and their verified parts.

Invariants:

* One in-flight chunked write per ``(site, digest)``: ``upload_for`` gets or creates its
  token atomically (``BEGIN IMMEDIATE`` on SQLite, a transaction-scoped advisory lock on
  PostgreSQL), so workers sharing a big blob all write into the same upload.
* A part is marked only after its bytes were verified and written (``put_part``
  returned); marking emits ``ChunkVerified``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import col

from datasync.db.engine import write_transaction
from datasync.db.transfer_tables import Upload, UploadPart
from datasync.events import ChunkVerified
from datasync.transfer.state._core import StateBase

__all__ = ["ChunkMap", "UploadState"]


@dataclass(frozen=True, slots=True)
class UploadState:
    token: str
    part_size: int
    parts_total: int


def _upload(site: str, digest: str) -> sa.ColumnElement[bool]:
    return sa.and_(col(Upload.site) == site, col(Upload.digest) == digest)


def _parts(site: str, digest: str) -> sa.ColumnElement[bool]:
    return sa.and_(col(UploadPart.site) == site, col(UploadPart.digest) == digest)


class ChunkMap(StateBase):
    """In-flight chunked writes and their verified parts (resume after a kill)."""

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
        with self._write() as txn:
            if txn.pg:
                key = int.from_bytes(
                    hashlib.blake2b(f"{site}\0{digest}".encode(), digest_size=8).digest(),
                    "big",
                    signed=True,
                )
                txn.conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
            row = txn.conn.execute(
                sa.select(col(Upload.token), col(Upload.part_size), col(Upload.parts_total)).where(
                    _upload(site, digest)
                )
            ).one_or_none()
            if row is not None and (row.part_size, row.parts_total) == (part_size, parts_total):
                return str(row.token)
            if row is not None:
                self._forget(txn.conn, site, digest)
            token = begin()
            txn.conn.execute(
                sa.insert(Upload).values(
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
                sa.select(col(Upload.token), col(Upload.part_size), col(Upload.parts_total)).where(
                    _upload(site, digest)
                )
            ).one_or_none()
        return None if row is None else UploadState(str(row[0]), int(row[1]), int(row[2]))

    def parts(self, site: str, digest: str) -> dict[int, str | None]:
        """Recorded part index -> what the store showed for it (``SupportsPartProofs``;
        None: no proof), in one read: the parts done and their proofs agree."""
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.select(col(UploadPart.idx), col(UploadPart.proof)).where(_parts(site, digest))
            )
            return {int(i): p for i, p in found}

    def parts_done(self, site: str, digest: str) -> set[int]:
        return set(self.parts(site, digest))

    def part_proofs(self, site: str, digest: str) -> dict[int, str]:
        """The recorded parts that have a proof, and their proofs."""
        return {i: p for i, p in self.parts(site, digest).items() if p is not None}

    def mark_part(
        self, site: str, digest: str, idx: int, token: str, proof: str | None = None
    ) -> bool:
        """Record part ``idx`` of the upload ``token`` as written and verified (idempotent),
        with what the store showed for it. A part sent again keeps its proof only if every
        send showed the same: the store holds whichever send came last, which need not be
        the last one recorded, so a disagreement leaves no proof (the commit re-reads).

        False if that upload is gone (committed, or replaced by another token meanwhile, as
        when a stalled task marks a part after the upload restarted): nothing recorded.
        """
        current = sa.and_(_upload(site, digest), col(Upload.token) == token)
        row = sa.select(
            sa.literal(site, sa.String),
            sa.literal(digest, sa.String),
            sa.literal(idx, sa.Integer),
            sa.literal(proof, sa.Text),
        ).where(sa.exists().where(current))
        with self._write() as txn:
            insert = postgresql.insert(UploadPart) if txn.pg else sqlite.insert(UploadPart)
            stmt = insert.from_select(["site", "digest", "idx", "proof"], row)
            agreed = sa.case(
                (col(UploadPart.proof) == stmt.excluded.proof, stmt.excluded.proof), else_=None
            )
            txn.conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["site", "digest", "idx"], set_={"proof": agreed}
                )
            )
            present = txn.conn.execute(
                sa.select(sa.literal(1)).where(
                    _parts(site, digest), col(UploadPart.idx) == idx, sa.exists().where(current)
                )
            ).first()
            if present is not None:
                txn.emit(ChunkVerified(site=site, digest=digest, part=idx))
            return present is not None

    def forget(self, site: str, digest: str) -> None:
        """Drop the upload and its parts (after commit, or to restart a stale upload)."""
        with write_transaction(self.engine) as conn:
            self._forget(conn, site, digest)

    @staticmethod
    def _forget(conn: sa.engine.Connection, site: str, digest: str) -> None:
        conn.execute(sa.delete(UploadPart).where(_parts(site, digest)))
        conn.execute(sa.delete(Upload).where(_upload(site, digest)))
