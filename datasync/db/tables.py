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
    "table_of",
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
    name: str = Field(sa_type=path_type(), unique=True)
    created_at: datetime = Field(default_factory=_utc_now, sa_type=sa.DateTime(timezone=True))


class Version(SQLModel, table=True):
    __tablename__ = "versions"
    __table_args__ = (
        sa.UniqueConstraint("dataset_pk", "version_id", name="uq_versions_dataset_version_id"),
    )

    pk: int | None = Field(default=None, primary_key=True)
    dataset_pk: int = Field(foreign_key="datasets.pk", ondelete="CASCADE")
    # sha256 hex of the canonical manifest bytes; NULL while pending.
    version_id: str | None = Field(default=None, sa_type=sa.String(64), index=True)
    format: str = Field(sa_type=sa.String(64))
    chunk_size: int = Field(sa_type=sa.BigInteger)
    files: int = Field(default=0, sa_type=sa.BigInteger)
    bytes: int = Field(default=0, sa_type=sa.BigInteger)
    # False when registered from a producer manifest: nobody has hashed these bytes yet.
    verified: bool
    # Where it was registered from ("directory:/data/x", "manifest:file.jsonl", "aws:runs/7").
    # ``datasync.transfer.sites.site_for_source`` reads it to find the source replicas.
    source: str = Field(default="", sa_type=sa.Text)
    created_at: datetime = Field(default_factory=_utc_now, sa_type=sa.DateTime(timezone=True))


class Entry(SQLModel, table=True):
    __tablename__ = "entries"
    __table_args__ = ({"sqlite_with_rowid": False},)

    version_pk: int = Field(primary_key=True, foreign_key="versions.pk", ondelete="CASCADE")
    path: str = Field(primary_key=True, sa_type=path_type())
    size: int = Field(sa_type=sa.BigInteger)
    digest: str = Field(sa_type=sa.String(64))
    # JSON array of chunk digests, NULL for files no larger than one chunk.
    chunks: str | None = Field(default=None, sa_type=sa.Text)


class Label(SQLModel, table=True):
    __tablename__ = "labels"

    dataset_pk: int = Field(primary_key=True, foreign_key="datasets.pk", ondelete="CASCADE")
    name: str = Field(primary_key=True, sa_type=sa.String(128))
    version_pk: int = Field(foreign_key="versions.pk", ondelete="CASCADE", index=True)
    updated_at: datetime = Field(default_factory=_utc_now, sa_type=sa.DateTime(timezone=True))


def table_of(model: type[SQLModel]) -> sa.Table:
    """The Core ``Table`` of a table model, for bulk statements and ``INSERT ... SELECT``.

    SQLModel does not type ``__table__``; the mapper's ``local_table`` is the same object.
    """
    table = sa.inspect(model).local_table
    if not isinstance(table, sa.Table):  # pragma: no cover - every table model has one
        raise TypeError(f"{model.__name__} is not a table model")
    return table


# Core handles for modules that build statements on ``Table.c`` (the manifest code itself
# uses the model classes with ``sqlmodel.col``).
datasets_table = table_of(Dataset)
versions_table = table_of(Version)
entries_table = table_of(Entry)
labels_table = table_of(Label)
