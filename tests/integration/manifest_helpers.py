"""Helpers shared by the manifest-service integration tests (not fixtures: plain functions)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from datasync.manifest.hashing import digest_bytes
from datasync.models import FileEntry

TABLES = ("datasets", "versions", "entries", "labels")


def digest_of(i: int) -> str:
    return digest_bytes(str(i).encode())


def entries(n: int, *, prefix: str = "f", salt: int = 0) -> list[FileEntry]:
    """``n`` small synthetic entries in canonical order."""
    return [FileEntry(f"{prefix}/{i:06d}.bin", i, digest_of(i + salt)) for i in range(n)]


def write_producer(path: Path, rows: Iterable[dict[str, Any] | str], chunk_size: int = 0) -> Path:
    """A producer manifest: header line then one line per row (str rows are written raw)."""
    header: dict[str, Any] = {"format": "datasync-producer/1"}
    if chunk_size:
        header["chunk_size"] = chunk_size
    with path.open("w", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def row(path: str, size: int = 1, digest: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"path": path, "size": size, "digest": digest or digest_of(size), **extra}


def counts(url: str, tables: Iterable[str] = TABLES) -> dict[str, int]:
    """Row counts of every manifest table (or of ``tables``): equal before/after means no
    state changed."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return {
                t: int(conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one())
                for t in tables
            }
    finally:
        engine.dispose()
