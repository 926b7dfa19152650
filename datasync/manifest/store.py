"""The manifest store: register, resolve, label, list, diff and export versions.

Registration is one write transaction (``BEGIN IMMEDIATE`` on SQLite):

1. get or create the dataset row, insert a *pending* version row (``version_id`` NULL);
2. bulk-insert the entries in batches (``executemany`` on SQLite, ``COPY`` on PostgreSQL),
   each batch under a savepoint so a duplicate path can be named precisely;
3. compute the version id (sha256 of the canonical bytes) with ``VersionIdBuilder``: fed
   during step 2 while the input arrives in canonical order (a directory scan always
   does), else by streaming the rows back ``ORDER BY path``; either way a duplicate path
   is rejected;
4. if the dataset already has a sealed version with that id, roll everything back and
   return it (``created=False``); otherwise seal the row and move ``latest`` (and the
   requested labels) to it, then commit.

Any error rolls the transaction back, so a rejected registration changes nothing
(invariant 1: a sealed version never changes; identical content yields the same id).
Memory stays bounded by one batch, whatever the number of files.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from datasync.db.engine import is_postgresql, is_sqlite, write_transaction
from datasync.db.tables import datasets_table, entries_table, labels_table, versions_table
from datasync.errors import InvalidManifest, UnknownReference
from datasync.manifest.canonical import VersionIdBuilder, encode_entry, encode_header
from datasync.manifest.diff import Change, merge_changes
from datasync.manifest.refs import LATEST, check_dataset_name, check_label, is_id_prefix, parse_ref
from datasync.models import FileEntry, ManifestHeader, VersionSummary

__all__ = ["ManifestStore", "Registration"]

BATCH_ROWS = 20_000
STREAM_ROWS = 10_000
SQLITE_BULK_CACHE_KIB = 256 * 1024
SQLITE_DEFAULT_CACHE = -2000  # SQLite's own default (2000 KiB)
_AMBIGUOUS_SHOWN = 10
_cursor_ids = itertools.count()

_D, _V, _E, _L = datasets_table, versions_table, entries_table, labels_table
_EntryRow = tuple[int, str, int, str, str | None]


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
    ) -> Registration:
        """Register ``entries`` (any order) as a version of ``dataset``.

        Returns the new version (``created=True``) or the existing one with identical
        content (``created=False``; explicit ``labels`` still move to it, and a verified
        registration marks an unverified twin verified). Raises ``UserError`` subclasses
        for bad input, with nothing changed.
        """
        check_dataset_name(dataset)
        wanted = [check_label(label) for label in labels]
        try:
            with write_transaction(self.engine) as conn:
                dataset_pk = _get_or_create_dataset(conn, dataset)
                version_pk = conn.execute(
                    _V.insert()
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
                    .returning(_V.c.pk)
                ).scalar_one()
                builder = VersionIdBuilder(header)
                with _bulk_cache(conn):
                    if _insert_entries(conn, version_pk, entries, builder):
                        version_id = builder.hexdigest()
                        files, nbytes = builder.files, builder.bytes
                    else:
                        version_id, files, nbytes = _compute_id(conn, version_pk, header)
                _seal(conn, dataset_pk, version_pk, version_id, files, nbytes)
                for name in (LATEST, *wanted):
                    _move_label(conn, dataset_pk, name, version_pk)
        except _AlreadySealed as exc:
            with write_transaction(self.engine) as conn:
                dataset_pk = _get_or_create_dataset(conn, dataset)
                for name in wanted:
                    _move_label(conn, dataset_pk, name, exc.version_pk)
                if verified:
                    conn.execute(_V.update().where(_V.c.pk == exc.version_pk).values(verified=True))
            return Registration(self._summary(exc.version_pk), created=False)
        return Registration(self._summary(version_pk), created=True)

    # -------------------------------------------------------------------- reading

    def list_datasets(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(_D.c.name).order_by(_D.c.name)).scalars())

    def list_versions(self, dataset: str) -> list[VersionSummary]:
        """Sealed versions of ``dataset``, newest first."""
        check_dataset_name(dataset)
        with self.engine.connect() as conn:
            dataset_pk = _dataset_pk(conn, dataset)
            rows = conn.execute(
                _summary_query()
                .where(_V.c.dataset_pk == dataset_pk)
                .order_by(_V.c.created_at.desc(), _V.c.pk.desc())
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
                sa.select(_V.c.chunk_size, _V.c.format).where(_V.c.pk == _version_pk(conn, version))
            ).one()
        return ManifestHeader(chunk_size=row.chunk_size, format=row.format)

    def iter_entries(self, version: VersionSummary) -> Iterator[FileEntry]:
        """Stream the entries of ``version`` in canonical (bytewise path) order."""
        with self.engine.connect() as conn:
            for path, size, digest, chunks in _ordered_entries(conn, _version_pk(conn, version)):
                yield _to_entry(path, size, digest, chunks)

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
                yield from _sql_diff(conn, old_pk, new_pk)
                return
            old_rows = ((p, s, d) for p, s, d, _ in _ordered_entries(conn, old_pk, chunks=False))
            new_rows = ((p, s, d) for p, s, d, _ in _ordered_entries(conn, new_pk, chunks=False))
            yield from merge_changes(old_rows, new_rows)

    # -------------------------------------------------------------------- labels

    def set_label(self, ref: str, label: str) -> VersionSummary:
        """Point ``label`` of the ref's dataset at the version ``ref`` resolves to."""
        check_label(label)
        with write_transaction(self.engine) as conn:
            version_pk = _resolve(conn, ref)
            dataset_pk = conn.execute(
                sa.select(_V.c.dataset_pk).where(_V.c.pk == version_pk)
            ).scalar_one()
            _move_label(conn, dataset_pk, label, version_pk)
        return self._summary(version_pk)

    def mark_verified(self, version: VersionSummary) -> None:
        """Record that every byte of ``version`` was hashed and matched (first transfer)."""
        with write_transaction(self.engine) as conn:
            conn.execute(
                _V.update().where(_V.c.pk == _version_pk(conn, version)).values(verified=True)
            )

    # ------------------------------------------------------------------ helpers

    def _summary(self, version_pk: int, conn: Connection | None = None) -> VersionSummary:
        if conn is None:
            with self.engine.connect() as own:
                return self._summary(version_pk, own)
        row = conn.execute(_summary_query().where(_V.c.pk == version_pk)).one()
        labels = conn.execute(
            sa.select(_L.c.name).where(_L.c.version_pk == version_pk).order_by(_L.c.name)
        ).scalars()
        return _to_summary(row, tuple(labels))


# ------------------------------------------------------------------------ writing


@contextmanager
def _bulk_cache(conn: Connection) -> Iterator[None]:
    """On SQLite, a large page cache while one version's rows go in, then the default.

    Input in arbitrary order inserts all over the ``(version_pk, path)`` index; with the
    default 2 MB cache every insert would touch disk. The pages are freed afterwards.
    """
    if not is_sqlite(conn):
        yield
        return
    conn.exec_driver_sql(f"PRAGMA cache_size=-{SQLITE_BULK_CACHE_KIB}")
    try:
        yield
    finally:
        conn.exec_driver_sql(f"PRAGMA cache_size={SQLITE_DEFAULT_CACHE}")


def _get_or_create_dataset(conn: Connection, name: str) -> int:
    found = conn.execute(sa.select(_D.c.pk).where(_D.c.name == name)).scalar_one_or_none()
    if found is not None:
        return int(found)
    # Savepoint: a concurrent creator (PostgreSQL) makes the insert fail; then it exists.
    try:
        with conn.begin_nested():
            conn.execute(_D.insert().values(name=name, created_at=datetime.now(UTC)))
    except sa.exc.IntegrityError:
        pass
    return int(conn.execute(sa.select(_D.c.pk).where(_D.c.name == name)).scalar_one())


def _insert_entries(
    conn: Connection, version_pk: int, entries: Iterable[FileEntry], builder: VersionIdBuilder
) -> bool:
    """Insert ``entries``; while they arrive in canonical order, also feed ``builder``.

    Returns True if the whole input was in canonical order (a scan always is), so the
    builder already holds the version id and the ``ORDER BY path`` pass can be skipped.
    """
    batch: list[_EntryRow] = []
    ordered = True
    last = b""
    for entry in entries:
        if ordered:
            key = entry.path.encode("utf-8")
            if key > last:  # paths are never empty, so the first one passes
                builder.add(entry)
                last = key
            elif key == last:
                raise _duplicate(entry.path)
            else:
                ordered = False  # producer manifests may come in any order
        chunks = json.dumps(list(entry.chunks), separators=(",", ":")) if entry.chunks else None
        batch.append((version_pk, entry.path, entry.size, entry.digest, chunks))
        if len(batch) >= BATCH_ROWS:
            _flush(conn, version_pk, batch)
            batch = []
    if batch:
        _flush(conn, version_pk, batch)
    return ordered


def _duplicate(path: str) -> InvalidManifest:
    return InvalidManifest(
        f"duplicate path {path!r}: each path may appear once (paths are compared after "
        "Unicode NFC normalization, so NFC/NFD spellings of one name are duplicates)"
    )


def _flush(conn: Connection, version_pk: int, batch: list[_EntryRow]) -> None:
    try:
        with conn.begin_nested():
            if is_postgresql(conn):
                _copy_rows(conn, batch)
            else:
                conn.exec_driver_sql(
                    "INSERT INTO entries (version_pk, path, size, digest, chunks) "
                    "VALUES (?, ?, ?, ?, ?)",
                    batch,
                )
    except (sa.exc.IntegrityError, psycopg.IntegrityError) as exc:
        raise _duplicate(_find_duplicate(conn, version_pk, batch)) from exc


def _copy_rows(conn: Connection, batch: list[_EntryRow]) -> None:
    # COPY is several times faster than multi-row INSERT for a million rows.
    raw: Any = conn.connection.driver_connection
    with (
        raw.cursor() as cur,
        cur.copy("COPY entries (version_pk, path, size, digest, chunks) FROM STDIN") as copy,
    ):
        for row in batch:
            copy.write_row(row)


def _find_duplicate(conn: Connection, version_pk: int, batch: list[_EntryRow]) -> str:
    seen: set[str] = set()
    for row in batch:
        if row[1] in seen:
            return row[1]
        seen.add(row[1])
    paths = [row[1] for row in batch]
    for start in range(0, len(paths), 500):
        hit = conn.execute(
            sa.select(_E.c.path)
            .where(_E.c.version_pk == version_pk, _E.c.path.in_(paths[start : start + 500]))
            .limit(1)
        ).scalar_one_or_none()
        if hit is not None:
            return str(hit)
    return "<unknown>"


def _compute_id(conn: Connection, version_pk: int, header: ManifestHeader) -> tuple[str, int, int]:
    builder = VersionIdBuilder(header)
    files = nbytes = 0
    for path, size, digest, chunks in _ordered_entries(conn, version_pk):
        builder.add(_to_entry(path, size, digest, chunks))
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
                _V.update()
                .where(_V.c.pk == version_pk)
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
        sa.select(_V.c.pk).where(_V.c.dataset_pk == dataset_pk, _V.c.version_id == version_id)
    ).scalar_one_or_none()
    return None if found is None else int(found)


def _move_label(conn: Connection, dataset_pk: int, name: str, version_pk: int) -> None:
    now = datetime.now(UTC)
    moved = conn.execute(
        _L.update()
        .where(_L.c.dataset_pk == dataset_pk, _L.c.name == name)
        .values(version_pk=version_pk, updated_at=now)
    )
    if moved.rowcount == 0:
        conn.execute(
            _L.insert().values(
                dataset_pk=dataset_pk, name=name, version_pk=version_pk, updated_at=now
            )
        )


# ------------------------------------------------------------------------ reading


def _ordered_entries(
    conn: Connection, version_pk: int, *, chunks: bool = True
) -> Iterator[tuple[str, int, str, str | None]]:
    """Rows ``ORDER BY path`` as plain tuples, streamed without buffering the version.

    Goes to the driver directly: at a million rows, SQLAlchemy's per-row processing costs
    more than the query. PostgreSQL uses a named (server-side) cursor fetching
    ``STREAM_ROWS`` at a time; SQLite cursors step lazily anyway. It runs on ``conn``'s
    connection, so it sees that connection's uncommitted rows.
    """
    raw: Any = conn.connection.driver_connection
    column = "chunks" if chunks else "NULL"
    if is_postgresql(conn):
        cursor = raw.cursor(name=f"entries_{version_pk}_{next(_cursor_ids)}")
        cursor.itersize = STREAM_ROWS
        param = "%s"
    else:
        cursor = raw.cursor()
        param = "?"
    sql = (
        f"SELECT path, size, digest, {column} FROM entries WHERE version_pk = {param} ORDER BY path"
    )
    try:
        cursor.execute(sql, (version_pk,))
        yield from cursor
    finally:
        cursor.close()


_PG_DIFF = """
SELECT coalesce(a.path, b.path) AS path, a.path IS NULL, b.path IS NULL,
       a.size, a.digest, b.size, b.digest
FROM (SELECT path, size, digest FROM entries WHERE version_pk = %(old)s) AS a
FULL JOIN (SELECT path, size, digest FROM entries WHERE version_pk = %(new)s) AS b
  ON a.path = b.path
WHERE a.path IS NULL OR b.path IS NULL OR a.size <> b.size OR a.digest <> b.digest
ORDER BY 1
"""


def _sql_diff(conn: Connection, old_pk: int, new_pk: int) -> Iterator[Change]:
    raw: Any = conn.connection.driver_connection
    with raw.cursor(name=f"diff_{old_pk}_{new_pk}_{next(_cursor_ids)}") as cursor:
        cursor.itersize = STREAM_ROWS
        cursor.execute(_PG_DIFF, {"old": old_pk, "new": new_pk})
        for path, added, removed, old_size, old_digest, new_size, new_digest in cursor:
            if added:
                yield Change("added", path, new_size=new_size, new_digest=new_digest)
            elif removed:
                yield Change("removed", path, old_size=old_size, old_digest=old_digest)
            else:
                yield Change("changed", path, old_size, old_digest, new_size, new_digest)


def _to_entry(path: str, size: int, digest: str, chunks: str | None) -> FileEntry:
    return FileEntry(path, size, digest, tuple(json.loads(chunks)) if chunks else ())


def _dataset_pk(conn: Connection, name: str) -> int:
    found = conn.execute(sa.select(_D.c.pk).where(_D.c.name == name)).scalar_one_or_none()
    if found is None:
        raise UnknownReference(f"unknown dataset {name!r}")
    return int(found)


def _version_pk(conn: Connection, version: VersionSummary) -> int:
    found = conn.execute(
        sa.select(_V.c.pk)
        .join(_D, _D.c.pk == _V.c.dataset_pk)
        .where(_D.c.name == version.dataset, _V.c.version_id == version.version_id)
    ).scalar_one_or_none()
    if found is None:
        raise UnknownReference(f"unknown version {version.dataset}@{version.version_id}")
    return int(found)


def _resolve(conn: Connection, text: str) -> int:
    ref = parse_ref(text)
    dataset_pk = _dataset_pk(conn, ref.dataset)
    by_label = conn.execute(
        sa.select(_L.c.version_pk).where(_L.c.dataset_pk == dataset_pk, _L.c.name == ref.ref)
    ).scalar_one_or_none()
    if by_label is not None:
        return int(by_label)
    if is_id_prefix(ref.ref):
        matches = conn.execute(
            sa.select(_V.c.pk, _V.c.version_id)
            .where(_V.c.dataset_pk == dataset_pk, _V.c.version_id.startswith(ref.ref))
            .order_by(_V.c.version_id)
            .limit(_AMBIGUOUS_SHOWN + 1)
        ).all()
        if len(matches) == 1:
            return int(matches[0].pk)
        if matches:
            shown = ", ".join(str(m.version_id)[:16] for m in matches[:_AMBIGUOUS_SHOWN])
            more = " and more" if len(matches) > _AMBIGUOUS_SHOWN else ""
            raise UnknownReference(
                f"{text}: id prefix {ref.ref!r} is ambiguous; it matches {shown}{more}"
            )
    labels = sorted(
        conn.execute(sa.select(_L.c.name).where(_L.c.dataset_pk == dataset_pk)).scalars()
    )
    hint = f" (labels: {', '.join(labels)})" if labels else ""
    raise UnknownReference(f"{text}: no label or version id {ref.ref!r} in {ref.dataset}{hint}")


def _summary_query() -> sa.Select[Any]:
    return (
        sa.select(
            _V.c.pk,
            _D.c.name.label("dataset"),
            _V.c.version_id,
            _V.c.files,
            _V.c.bytes,
            _V.c.chunk_size,
            _V.c.created_at,
            _V.c.verified,
        )
        .join(_D, _D.c.pk == _V.c.dataset_pk)
        .where(_V.c.version_id.is_not(None))
    )


def _labels_by_version(conn: Connection, dataset_pk: int) -> dict[int, tuple[str, ...]]:
    out: dict[int, list[str]] = {}
    for version_pk, name in conn.execute(
        sa.select(_L.c.version_pk, _L.c.name)
        .where(_L.c.dataset_pk == dataset_pk)
        .order_by(_L.c.name)
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
