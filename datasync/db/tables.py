"""SQLModel tables of the manifest store: datasets, versions, entries, labels.

Invariants the schema keeps (the store relies on them):

* A ``versions`` row has ``version_id`` NULL only inside the registering transaction
  (pending). Once sealed it never changes; ``(dataset_pk, version_id)`` is unique, so two
  racing registrations of the same content cannot both seal.
* ``entries`` has primary key ``(version_pk, path)``: a path appears once per version, and
  the index serves ``ORDER BY path`` for id computation, diff and export.
* Paths compare bytewise (UTF-8 byte order == code point order): SQLite's default BINARY
  collation does this; on PostgreSQL the column is ``COLLATE "C"``.
* ``labels`` are movable pointers ``(dataset_pk, name) -> version_pk``.

Deleting a version cascades to its entries and labels.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

__all__ = [
    "Dataset",
    "Entry",
    "Label",
    "Version",
    "datasets_table",
    "entries_table",
    "labels_table",
    "path_type",
    "versions_table",
]


def path_type() -> sa.types.TypeEngine[str]:
    """Text compared bytewise on every engine (``COLLATE "C"`` on PostgreSQL)."""
    return sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Dataset(SQLModel, table=True):
    __tablename__ = "datasets"

    pk: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=sa.Column(path_type(), nullable=False, unique=True))
    created_at: datetime = Field(
        default_factory=_utc_now, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )


class Version(SQLModel, table=True):
    __tablename__ = "versions"
    __table_args__ = (
        sa.UniqueConstraint("dataset_pk", "version_id", name="uq_versions_dataset_version_id"),
    )

    pk: int | None = Field(default=None, primary_key=True)
    dataset_pk: int = Field(
        sa_column=sa.Column(
            sa.Integer, sa.ForeignKey("datasets.pk", ondelete="CASCADE"), nullable=False
        )
    )
    # sha256 hex of the canonical manifest bytes; NULL while pending.
    version_id: str | None = Field(default=None, sa_column=sa.Column(sa.String(64), index=True))
    format: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    chunk_size: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    files: int = Field(default=0, sa_column=sa.Column(sa.BigInteger, nullable=False))
    bytes: int = Field(default=0, sa_column=sa.Column(sa.BigInteger, nullable=False))
    # False when registered from a producer manifest: nobody has hashed these bytes yet.
    verified: bool = Field(sa_column=sa.Column(sa.Boolean, nullable=False))
    # Where it was registered from ("directory:/data/x", "manifest:file.jsonl"), informational.
    source: str = Field(default="", sa_column=sa.Column(sa.Text, nullable=False))
    created_at: datetime = Field(
        default_factory=_utc_now, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )


class Entry(SQLModel, table=True):
    __tablename__ = "entries"
    __table_args__ = ({"sqlite_with_rowid": False},)

    version_pk: int = Field(
        sa_column=sa.Column(
            sa.Integer,
            sa.ForeignKey("versions.pk", ondelete="CASCADE"),
            primary_key=True,
        )
    )
    path: str = Field(sa_column=sa.Column(path_type(), primary_key=True))
    size: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    digest: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    # JSON array of chunk digests, NULL for files no larger than one chunk.
    chunks: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))


class Label(SQLModel, table=True):
    __tablename__ = "labels"

    dataset_pk: int = Field(
        sa_column=sa.Column(
            sa.Integer, sa.ForeignKey("datasets.pk", ondelete="CASCADE"), primary_key=True
        )
    )
    name: str = Field(sa_column=sa.Column(sa.String(128), primary_key=True))
    version_pk: int = Field(
        sa_column=sa.Column(
            sa.Integer, sa.ForeignKey("versions.pk", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    updated_at: datetime = Field(
        default_factory=_utc_now, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )


# Core handles for bulk statements (SQLModel does not type ``__table__``).
datasets_table: sa.Table = Dataset.__table__  # type: ignore[attr-defined]
versions_table: sa.Table = Version.__table__  # type: ignore[attr-defined]
entries_table: sa.Table = Entry.__table__  # type: ignore[attr-defined]
labels_table: sa.Table = Label.__table__  # type: ignore[attr-defined]
