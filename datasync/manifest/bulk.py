"""Driver-level fast paths for the ``entries`` table: bulk insert, ordered reads, SQL diff.

At a million rows the ORM's per-row work costs more than the database's, so these go
to the DB-API connection under the caller's SQLAlchemy transaction (same connection, so
they see its uncommitted rows and roll back with it).

Inserting (``insert_entries``): batches of ``BATCH_ROWS``, ``executemany`` on SQLite and
``COPY`` on PostgreSQL, each under a savepoint so a duplicate path can be named. While the
input arrives in canonical order (a directory scan always does) the rows go straight into
``entries`` and the caller's ``VersionIdBuilder`` is fed on the way, so no second pass is
needed. Input in any other order (producer manifests) is still accepted:

* on PostgreSQL the remaining rows are copied into an unindexed temporary table and moved
  into ``entries`` with one ``INSERT ... SELECT ... ORDER BY path``, because random-order
  inserts into the ``(version_pk, path)`` B-tree cost several times more than a sort;
* on SQLite (in-process, no round trips) they go in directly with a large page cache.

Memory is bounded by one batch in every case.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlmodel import col

from datasync.db.engine import is_postgresql, is_sqlite
from datasync.db.tables import Entry
from datasync.errors import InvalidManifest
from datasync.manifest.canonical import VersionIdBuilder
from datasync.manifest.diff import Change
from datasync.models import FileEntry

__all__ = [
    "BATCH_ROWS",
    "STREAM_ROWS",
    "bulk_cache",
    "duplicate_error",
    "insert_entries",
    "ordered_entries",
    "refresh_statistics",
    "sql_diff",
    "to_entry",
]

BATCH_ROWS = 20_000
STREAM_ROWS = 10_000
SQLITE_BULK_CACHE_KIB = 256 * 1024
SQLITE_DEFAULT_CACHE = -2000  # SQLite's own default (2000 KiB)
PG_SORT_MEMORY = "256MB"  # server-side work_mem for the staging sort (this transaction only)

_EntryRow = tuple[int, str, int, str, str | None]
_COLUMNS = "version_pk, path, size, digest, chunks"
_cursor_ids = itertools.count()


def duplicate_error(path: str) -> InvalidManifest:
    return InvalidManifest(
        f"duplicate path {path!r}: each path may appear once (paths are compared after "
        "Unicode NFC normalization, so NFC/NFD spellings of one name are duplicates)"
    )


@contextmanager
def bulk_cache(conn: Connection) -> Iterator[None]:
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


def insert_entries(
    conn: Connection, version_pk: int, entries: Iterable[FileEntry], builder: VersionIdBuilder
) -> bool:
    """Insert ``entries``; while they arrive in canonical order, also feed ``builder``.

    Returns True if the whole input was in canonical order, so the builder already holds
    the version id and the ``ORDER BY path`` pass can be skipped. Raises
    ``InvalidManifest`` naming a duplicate path.
    """
    staging = False
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
                raise duplicate_error(entry.path)
            else:
                ordered = False
                if is_postgresql(conn):
                    _create_staging(conn)
                    staging = True
        chunks = json.dumps(list(entry.chunks), separators=(",", ":")) if entry.chunks else None
        batch.append((version_pk, entry.path, entry.size, entry.digest, chunks))
        if len(batch) >= BATCH_ROWS:
            _flush(conn, version_pk, batch, staging)
            batch = []
    if batch:
        _flush(conn, version_pk, batch, staging)
    if staging:
        _merge_staging(conn, version_pk)
    return ordered


def refresh_statistics(conn: Connection) -> None:
    """PostgreSQL: re-sample ``entries`` after a bulk load so plans see its real size.

    Autovacuum would get there eventually; a diff right after a registration should not
    be planned for a table it believes to be empty. Sampling costs well under a second.
    """
    if is_postgresql(conn):
        conn.exec_driver_sql("ANALYZE entries")


def _flush(conn: Connection, version_pk: int, batch: list[_EntryRow], staging: bool) -> None:
    duplicate: tuple[type[Exception], ...] = (sa.exc.IntegrityError,)
    if is_postgresql(conn):
        # COPY raises the driver's own error. Imported here: a process on SQLite never
        # loads psycopg (it costs a short command like ``register`` a tenth of a second).
        import psycopg

        duplicate = (sa.exc.IntegrityError, psycopg.IntegrityError)
    try:
        with conn.begin_nested():
            if is_postgresql(conn):
                _copy_rows(conn, "entries_staging" if staging else "entries", batch)
            else:
                conn.exec_driver_sql(
                    f"INSERT INTO entries ({_COLUMNS}) VALUES (?, ?, ?, ?, ?)", batch
                )
    except duplicate as exc:
        raise duplicate_error(_find_duplicate(conn, version_pk, batch)) from exc


def _copy_rows(conn: Connection, table: str, batch: list[_EntryRow]) -> None:
    # COPY is several times faster than multi-row INSERT for a million rows.
    raw: Any = conn.connection.driver_connection
    with raw.cursor() as cur, cur.copy(f"COPY {table} ({_COLUMNS}) FROM STDIN") as copy:
        for row in batch:
            copy.write_row(row)


def _create_staging(conn: Connection) -> None:
    # Temporary and dropped at the end of the transaction, whatever its outcome.
    conn.exec_driver_sql(
        'CREATE TEMPORARY TABLE entries_staging (version_pk integer, path text COLLATE "C", '
        "size bigint, digest varchar(64), chunks text) ON COMMIT DROP"
    )
    conn.exec_driver_sql(f"SET LOCAL work_mem = '{PG_SORT_MEMORY}'")


def _merge_staging(conn: Connection, version_pk: int) -> None:
    try:
        with conn.begin_nested():
            conn.exec_driver_sql(
                f"INSERT INTO entries ({_COLUMNS}) "
                f"SELECT {_COLUMNS} FROM entries_staging ORDER BY path"
            )
    except sa.exc.IntegrityError as exc:
        twin = conn.exec_driver_sql(
            "SELECT path FROM entries_staging GROUP BY path HAVING count(*) > 1 LIMIT 1"
        ).scalar_one_or_none()
        if twin is None:
            twin = conn.exec_driver_sql(
                "SELECT s.path FROM entries_staging s JOIN entries e "
                "ON e.version_pk = %(pk)s AND e.path = s.path LIMIT 1",
                {"pk": version_pk},
            ).scalar_one_or_none()
        raise duplicate_error(str(twin) if twin is not None else "<unknown>") from exc


def _find_duplicate(conn: Connection, version_pk: int, batch: list[_EntryRow]) -> str:
    seen: set[str] = set()
    for row in batch:
        if row[1] in seen:
            return row[1]
        seen.add(row[1])
    paths = [row[1] for row in batch]
    for start in range(0, len(paths), 500):
        hit = conn.execute(
            sa.select(col(Entry.path))
            .where(
                col(Entry.version_pk) == version_pk,
                col(Entry.path).in_(paths[start : start + 500]),
            )
            .limit(1)
        ).scalar_one_or_none()
        if hit is not None:
            return str(hit)
    return "<unknown>"


def ordered_entries(
    conn: Connection, version_pk: int, *, chunks: bool = True
) -> Iterator[tuple[str, int, str, str | None]]:
    """Rows ``ORDER BY path`` as plain tuples, streamed without buffering the version.

    PostgreSQL uses a named (server-side) cursor fetching ``STREAM_ROWS`` at a time;
    SQLite cursors step lazily anyway.
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


def to_entry(path: str, size: int, digest: str, chunks: str | None) -> FileEntry:
    return FileEntry(path, size, digest, tuple(json.loads(chunks)) if chunks else ())


_PG_DIFF = """
SELECT coalesce(a.path, b.path) AS path, a.path IS NULL, b.path IS NULL,
       a.size, a.digest, b.size, b.digest
FROM (SELECT path, size, digest FROM entries WHERE version_pk = %(old)s::integer) AS a
FULL JOIN (SELECT path, size, digest FROM entries WHERE version_pk = %(new)s::integer) AS b
  ON a.path = b.path
WHERE a.path IS NULL OR b.path IS NULL OR a.size <> b.size OR a.digest <> b.digest
ORDER BY 1
"""


def sql_diff(conn: Connection, old_pk: int, new_pk: int) -> Iterator[Change]:
    """PostgreSQL: the diff as one merge full join; only differences leave the server."""
    # The server bounds the join's memory by work_mem (a hash join spills in batches).
    # JIT-compiling this one query costs more than it saves (measured: ~0.3 s of ~2 s).
    conn.exec_driver_sql("SET LOCAL jit = off")
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
