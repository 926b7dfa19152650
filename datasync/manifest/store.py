"""The manifest store: register, resolve, label, list, diff and export versions.

Registration is one write transaction (``BEGIN IMMEDIATE`` on SQLite):

1. get or create the dataset row, insert a *pending* version row (``version_id`` NULL);
2. bulk-insert the entries (``datasync.manifest.bulk``: ``executemany`` on SQLite,
   ``COPY`` on PostgreSQL, batches under savepoints so a duplicate path can be named);
3. compute the version id (sha256 of the canonical bytes) with ``VersionIdBuilder``: fed
   during step 2 while the input arrives in canonical order (a directory scan always
   does), else by streaming the rows back ``ORDER BY path``; either way a duplicate path
   is rejected;
4. if the dataset already has a sealed version with that id, roll everything back and
   return it (``created=False``); otherwise seal the row and move ``latest`` (and the
   requested labels) to it, then commit.

A caller that already hashed the entries in canonical order (a directory scan goes
through a ``VersionIdBuilder`` on its way to the spool) passes that ``version_id``: when
the dataset already has it sealed, nothing is inserted at all. Registering unchanged
content writes nothing unless it has something to change (a label to move, an
unverified twin to mark verified).

Any error rolls the transaction back, so a rejected registration changes nothing
(invariant 1: a sealed version never changes; identical content yields the same id).
Memory stays bounded by one batch, whatever the number of files.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlmodel import col

from datasync.db.engine import is_postgresql, write_transaction
from datasync.db.tables import Dataset, Label, Version
from datasync.errors import UnknownReference
from datasync.manifest.bulk import (
    bulk_cache,
    insert_entries,
    ordered_entries,
    refresh_statistics,
    sql_diff,
    to_entry,
)
from datasync.manifest.canonical import VersionIdBuilder, encode_entry, encode_header
from datasync.manifest.diff import Change, merge_changes
from datasync.manifest.refs import (
    LATEST,
    MIN_PREFIX,
    check_dataset_name,
    check_label,
    is_id_prefix,
    looks_like_id,
    parse_ref,
)
from datasync.models import FileEntry, ManifestHeader, VersionSummary

__all__ = ["ManifestStore", "Registration"]

_AMBIGUOUS_SHOWN = 10


@dataclass(frozen=True, slots=True)
class Registration:
    summary: VersionSummary
    created: bool


class _AlreadySealed(Exception):
    """Internal: the content is already a sealed version (rolls the transaction back)."""

    def __init__(self, version_pk: int) -> None:
        super().__init__(version_pk)
        self.version_pk = version_pk


class ManifestStore:
    """All manifest reads and writes. Thread-safe: every call uses its own connection."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ----------------------------------------------------------------- registration

    def register(
        self,
        dataset: str,
        header: ManifestHeader,
        entries: Iterable[FileEntry],
        *,
        labels: Sequence[str] = (),
        verified: bool = True,
        source: str = "",
        version_id: str | None = None,
    ) -> Registration:
        """Register ``entries`` (any order) as a version of ``dataset``.

        Returns the new version (``created=True``) or the existing one with identical
        content (``created=False``; explicit ``labels`` still move to it, and a verified
        registration marks an unverified twin verified). Raises ``UserError`` subclasses
        for bad input, with nothing changed. ``version_id``: the id of exactly these
        entries, if the caller computed it; then ``entries`` is not read at all when that
        version exists (and an id that turns out different is a bug, raised).
        """
        check_dataset_name(dataset)
        wanted = [check_label(label) for label in labels]
        if version_id is not None:
            with self.engine.connect() as conn:
                existing = _sealed_by_name(conn, dataset, version_id)
            if existing is not None:
                return self._existing(existing, wanted, verified)
        try:
            with write_transaction(self.engine) as conn:
                dataset_pk = _get_or_create_dataset(conn, dataset)
                version_pk = _pk(
                    conn.execute(
                        sa.insert(Version)
                        .values(
                            dataset_pk=dataset_pk,
                            version_id=None,
                            format=header.format,
                            chunk_size=header.chunk_size,
                            files=0,
                            bytes=0,
                            verified=verified,
                            source=source,
                            created_at=datetime.now(UTC),
                        )
                        .returning(col(Version.pk))
                    ).scalar_one()
                )
                builder = VersionIdBuilder(header)
                with bulk_cache(conn):
                    if insert_entries(conn, version_pk, entries, builder):
                        computed = builder.hexdigest()
                        files, nbytes = builder.files, builder.bytes
                    else:
                        computed, files, nbytes = _compute_id(conn, version_pk, header)
                if version_id is not None and computed != version_id:
                    raise RuntimeError(
                        f"registration of {dataset}: the caller's version id {version_id} "
                        f"is not the id of its entries ({computed})"
                    )
                _seal(conn, dataset_pk, version_pk, computed, files, nbytes)
                refresh_statistics(conn)
                for name in (LATEST, *wanted):
                    _move_label(conn, dataset_pk, name, version_pk)
        except _AlreadySealed as exc:
            return self._existing(exc.version_pk, wanted, verified)
        return Registration(self._summary(version_pk), created=True)

    def _existing(self, version_pk: int, wanted: list[str], verified: bool) -> Registration:
        """The outcome of registering content that is already ``version_pk``: the wanted
        labels move to it and a verified registration marks it verified, in one write
        transaction, and only if either changes something."""
        summary = self._summary(version_pk)
        moves = [name for name in wanted if name not in summary.labels]
        if moves or (verified and not summary.verified):
            with write_transaction(self.engine) as conn:
                dataset_pk = _dataset_pk(conn, summary.dataset)
                for name in moves:
                    _move_label(conn, dataset_pk, name, version_pk)
                if verified:
                    conn.execute(
                        sa.update(Version)
                        .where(col(Version.pk) == version_pk)
                        .values(verified=True)
                    )
            summary = self._summary(version_pk)
        return Registration(summary, created=False)

    # -------------------------------------------------------------------- reading

    def list_datasets(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(
                conn.execute(sa.select(col(Dataset.name)).order_by(col(Dataset.name))).scalars()
            )

    def list_versions(self, dataset: str) -> list[VersionSummary]:
        """Sealed versions of ``dataset``, newest first."""
        check_dataset_name(dataset)
        with self.engine.connect() as conn:
            dataset_pk = _dataset_pk(conn, dataset)
            rows = conn.execute(
                _summary_query()
                .where(col(Version.dataset_pk) == dataset_pk)
                .order_by(col(Version.created_at).desc(), col(Version.pk).desc())
            ).all()
            labels = _labels_by_version(conn, dataset_pk)
        return [_to_summary(row, labels.get(row.pk, ())) for row in rows]

    def resolve(self, ref: str) -> VersionSummary:
        """Resolve ``DATASET@REF`` (label, full id or unique id prefix) to a version."""
        with self.engine.connect() as conn:
            return self._summary(_resolve(conn, ref), conn=conn)

    def header(self, version: VersionSummary) -> ManifestHeader:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(col(Version.chunk_size), col(Version.format)).where(
                    col(Version.pk) == _version_pk(conn, version)
                )
            ).one()
        return ManifestHeader(chunk_size=row.chunk_size, format=row.format)

    def iter_entries(self, version: VersionSummary) -> Iterator[FileEntry]:
        """Stream the entries of ``version`` in canonical (bytewise path) order."""
        with self.engine.connect() as conn:
            for path, size, digest, chunks in ordered_entries(conn, _version_pk(conn, version)):
                yield to_entry(path, size, digest, chunks)

    def iter_manifest(self, version: VersionSummary) -> Iterator[bytes]:
        """Stream the canonical JSON Lines bytes of ``version`` (header line, then entries)."""
        yield encode_header(self.header(version))
        for entry in self.iter_entries(version):
            yield encode_entry(entry)

    def export(self, version: VersionSummary, out: BinaryIO) -> int:
        """Write the canonical manifest to ``out``; return the number of bytes written."""
        written = 0
        for line in self.iter_manifest(version):
            out.write(line)
            written += len(line)
        return written

    def diff(self, old: VersionSummary, new: VersionSummary) -> Iterator[Change]:
        """Stream the changes from ``old`` to ``new``, in path order.

        PostgreSQL computes it in SQL (a merge full join over the two index scans), so
        only the differences cross the wire. SQLite, in-process, merges two ordered
        cursors in Python (``merge_changes``). Neither holds a manifest in memory.
        """
        with self.engine.connect() as conn:
            old_pk, new_pk = _version_pk(conn, old), _version_pk(conn, new)
            if is_postgresql(conn):
                yield from sql_diff(conn, old_pk, new_pk)
                return
            old_rows = ((p, s, d) for p, s, d, _ in ordered_entries(conn, old_pk, chunks=False))
            new_rows = ((p, s, d) for p, s, d, _ in ordered_entries(conn, new_pk, chunks=False))
            yield from merge_changes(old_rows, new_rows)

    # -------------------------------------------------------------------- labels

    def set_label(self, ref: str, label: str) -> VersionSummary:
        """Point ``label`` of the ref's dataset at the version ``ref`` resolves to."""
        check_label(label)
        with write_transaction(self.engine) as conn:
            version_pk = _resolve(conn, ref)
            dataset_pk = conn.execute(
                sa.select(col(Version.dataset_pk)).where(col(Version.pk) == version_pk)
            ).scalar_one()
            _move_label(conn, dataset_pk, label, version_pk)
        return self._summary(version_pk)

    def mark_verified(self, version: VersionSummary) -> None:
        """Record that every byte of ``version`` was hashed and matched (first transfer)."""
        with write_transaction(self.engine) as conn:
            conn.execute(
                sa.update(Version)
                .where(col(Version.pk) == _version_pk(conn, version))
                .values(verified=True)
            )

    # ------------------------------------------------------------------ helpers

    def _summary(self, version_pk: int, conn: Connection | None = None) -> VersionSummary:
        if conn is None:
            with self.engine.connect() as own:
                return self._summary(version_pk, own)
        row = conn.execute(_summary_query().where(col(Version.pk) == version_pk)).one()
        labels = conn.execute(
            sa.select(col(Label.name))
            .where(col(Label.version_pk) == version_pk)
            .order_by(col(Label.name))
        ).scalars()
        return _to_summary(row, tuple(labels))


# ------------------------------------------------------------------------ writing


def _pk(value: int | None) -> int:
    """A primary key read back from the database: the models type it optional (None
    until inserted), a row never holds NULL."""
    if value is None:  # pragma: no cover - NOT NULL in the schema
        raise RuntimeError("the database returned a NULL primary key")
    return value


def _get_or_create_dataset(conn: Connection, name: str) -> int:
    found = conn.execute(
        sa.select(col(Dataset.pk)).where(col(Dataset.name) == name)
    ).scalar_one_or_none()
    if found is not None:
        return found
    # Savepoint: a concurrent creator (PostgreSQL) makes the insert fail; then it exists.
    try:
        with conn.begin_nested():
            conn.execute(sa.insert(Dataset).values(name=name, created_at=datetime.now(UTC)))
    except sa.exc.IntegrityError:
        pass
    return _pk(
        conn.execute(sa.select(col(Dataset.pk)).where(col(Dataset.name) == name)).scalar_one()
    )


def _compute_id(conn: Connection, version_pk: int, header: ManifestHeader) -> tuple[str, int, int]:
    builder = VersionIdBuilder(header)
    files = nbytes = 0
    for path, size, digest, chunks in ordered_entries(conn, version_pk):
        builder.add(to_entry(path, size, digest, chunks))
        files += 1
        nbytes += size
    return builder.hexdigest(), files, nbytes


def _seal(
    conn: Connection, dataset_pk: int, version_pk: int, version_id: str, files: int, nbytes: int
) -> None:
    existing = _sealed_pk(conn, dataset_pk, version_id)
    if existing is not None:
        raise _AlreadySealed(existing)
    try:
        with conn.begin_nested():
            conn.execute(
                sa.update(Version)
                .where(col(Version.pk) == version_pk)
                .values(version_id=version_id, files=files, bytes=nbytes)
            )
    except sa.exc.IntegrityError:
        # A concurrent registration of the same content sealed first (PostgreSQL).
        winner = _sealed_pk(conn, dataset_pk, version_id)
        if winner is None:
            raise
        raise _AlreadySealed(winner) from None


def _sealed_pk(conn: Connection, dataset_pk: int, version_id: str) -> int | None:
    found = conn.execute(
        sa.select(col(Version.pk)).where(
            col(Version.dataset_pk) == dataset_pk, col(Version.version_id) == version_id
        )
    ).scalar_one_or_none()
    return found


def _sealed_by_name(conn: Connection, dataset: str, version_id: str) -> int | None:
    found: int | None = conn.execute(
        sa.select(col(Version.pk))
        .join(Dataset, col(Dataset.pk) == col(Version.dataset_pk))
        .where(col(Dataset.name) == dataset, col(Version.version_id) == version_id)
    ).scalar_one_or_none()
    return found


def _move_label(conn: Connection, dataset_pk: int, name: str, version_pk: int) -> None:
    now = datetime.now(UTC)
    moved = conn.execute(
        sa.update(Label)
        .where(col(Label.dataset_pk) == dataset_pk, col(Label.name) == name)
        .values(version_pk=version_pk, updated_at=now)
    )
    if moved.rowcount == 0:
        conn.execute(
            sa.insert(Label).values(
                dataset_pk=dataset_pk, name=name, version_pk=version_pk, updated_at=now
            )
        )


# ------------------------------------------------------------------------ reading


def _dataset_pk(conn: Connection, name: str) -> int:
    found = conn.execute(
        sa.select(col(Dataset.pk)).where(col(Dataset.name) == name)
    ).scalar_one_or_none()
    if found is None:
        raise UnknownReference(f"unknown dataset {name!r}")
    return found


def _version_pk(conn: Connection, version: VersionSummary) -> int:
    found = _sealed_by_name(conn, version.dataset, version.version_id)
    if found is None:
        raise UnknownReference(f"unknown version {version.dataset}@{version.version_id}")
    return found


def _resolve(conn: Connection, text: str) -> int:
    ref = parse_ref(text)
    dataset_pk = _dataset_pk(conn, ref.dataset)
    if is_id_prefix(ref.ref):  # ids come first (``refs``); older hex labels after them
        found = _by_id_prefix(conn, dataset_pk, text, ref.ref)
        if found is None:
            found = _by_label(conn, dataset_pk, ref.ref)
    else:
        found = _by_label(conn, dataset_pk, ref.ref)
    if found is not None:
        return found
    if looks_like_id(ref.ref) and len(ref.ref) < MIN_PREFIX:
        raise UnknownReference(
            f"{text}: id prefix {ref.ref!r} is too short: give at least {MIN_PREFIX} hex"
            " digits of the version id"
        )
    labels = sorted(
        conn.execute(
            sa.select(col(Label.name)).where(col(Label.dataset_pk) == dataset_pk)
        ).scalars()
    )
    hint = f" (labels: {', '.join(labels)})" if labels else ""
    raise UnknownReference(f"{text}: no label or version id {ref.ref!r} in {ref.dataset}{hint}")


def _by_label(conn: Connection, dataset_pk: int, name: str) -> int | None:
    found: int | None = conn.execute(
        sa.select(col(Label.version_pk)).where(
            col(Label.dataset_pk) == dataset_pk, col(Label.name) == name
        )
    ).scalar_one_or_none()
    return found


def _by_id_prefix(conn: Connection, dataset_pk: int, text: str, prefix: str) -> int | None:
    """The version whose id starts with ``prefix``; None if none, refused if several."""
    matches = conn.execute(
        sa.select(col(Version.pk), col(Version.version_id))
        .where(col(Version.dataset_pk) == dataset_pk, col(Version.version_id).startswith(prefix))
        .order_by(col(Version.version_id))
        .limit(_AMBIGUOUS_SHOWN + 1)
    ).all()
    if len(matches) == 1:
        return int(matches[0].pk)
    if matches:
        shown = ", ".join(str(m.version_id)[:16] for m in matches[:_AMBIGUOUS_SHOWN])
        more = " and more" if len(matches) > _AMBIGUOUS_SHOWN else ""
        raise UnknownReference(
            f"{text}: id prefix {prefix!r} is ambiguous; it matches {shown}{more}"
        )
    return None


def _summary_query() -> sa.Select[*tuple[Any, ...]]:
    return (
        sa.select(
            col(Version.pk),
            col(Dataset.name).label("dataset"),
            col(Version.version_id),
            col(Version.files),
            col(Version.bytes),
            col(Version.chunk_size),
            col(Version.created_at),
            col(Version.verified),
        )
        .join(Dataset, col(Dataset.pk) == col(Version.dataset_pk))
        .where(col(Version.version_id).is_not(None))
    )


def _labels_by_version(conn: Connection, dataset_pk: int) -> dict[int, tuple[str, ...]]:
    out: dict[int, list[str]] = {}
    for version_pk, name in conn.execute(
        sa.select(col(Label.version_pk), col(Label.name))
        .where(col(Label.dataset_pk) == dataset_pk)
        .order_by(col(Label.name))
    ):
        out.setdefault(version_pk, []).append(name)
    return {pk: tuple(names) for pk, names in out.items()}


def _to_summary(row: sa.Row[Any], labels: tuple[str, ...]) -> VersionSummary:
    created: datetime = row.created_at
    if created.tzinfo is None:  # SQLite stores naive UTC
        created = created.replace(tzinfo=UTC)
    return VersionSummary(
        dataset=row.dataset,
        version_id=row.version_id,
        files=row.files,
        bytes=row.bytes,
        chunk_size=row.chunk_size,
        created_at=created.astimezone(UTC).isoformat(timespec="seconds"),
        labels=labels,
        verified=bool(row.verified),
    )
