"""Read a producer-supplied manifest (``datasync-producer/1`` JSON Lines) without re-hashing.

Format (schema: ``manifests/producer-manifest.schema.json``):

* line 1: ``{"format":"datasync-producer/1","chunk_size":N}``; ``chunk_size`` is optional
  and defaults to ``DEFAULT_CHUNK_SIZE``;
* then one object per file, ``{"path","size","digest","chunks"?}``, in ANY order.

Every line is validated as it is read, by hand-written checks equivalent to the JSON
Schema plus what a schema cannot express (chunk count against the header's chunk size,
UTF-8 byte lengths of paths, NFC, lone surrogates); ``tests/unit/test_producer.py`` pins
that the two agree. Errors are ``InvalidManifest`` (or ``InvalidPath``) naming the line.

Duplicates, and a file that another path needs as a directory (``a`` and ``a/b``),
cannot be seen in a stream in arbitrary order: the caller sorts entries by
``path_sort_key`` (in the database for large manifests) and ``VersionIdBuilder.add``
rejects them over the sorted stream (equal neighbours also catch NFC twins, since paths
come out normalized).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Final

from datasync.errors import InvalidManifest, InvalidPath
from datasync.manifest.canonical import (
    MANIFEST_FORMAT,
    check_chunk_size,
    entry_from_dict,
    loads_strict,
)
from datasync.models import DEFAULT_CHUNK_SIZE, FileEntry, ManifestHeader

__all__ = ["PRODUCER_FORMAT", "parse_producer_header", "read_producer_manifest"]

PRODUCER_FORMAT: Final = "datasync-producer/1"
_HEADER_KEYS: Final = frozenset({"format", "chunk_size"})


def parse_producer_header(obj: Any) -> ManifestHeader:
    """Validate a decoded producer header; returns the canonical header it implies."""
    if not isinstance(obj, dict):
        raise InvalidManifest(f"header must be a JSON object, got {type(obj).__name__}")
    extra = sorted(str(k) for k in obj if k not in _HEADER_KEYS)
    if extra:
        raise InvalidManifest(f"unknown header key(s) {extra} (allowed: chunk_size, format)")
    if obj.get("format") != PRODUCER_FORMAT:
        raise InvalidManifest(
            f"header format is {obj.get('format')!r}; expected {PRODUCER_FORMAT!r}"
        )
    chunk_size = check_chunk_size(obj.get("chunk_size", DEFAULT_CHUNK_SIZE))
    return ManifestHeader(chunk_size=chunk_size, format=MANIFEST_FORMAT)


def _parse_line(line: bytes, lineno: int) -> Any:
    try:
        return loads_strict(line)
    except UnicodeDecodeError as exc:
        raise InvalidManifest(f"line {lineno}: not valid UTF-8 ({exc.reason})") from None
    except ValueError as exc:  # json.JSONDecodeError and NaN/Infinity
        raise InvalidManifest(f"line {lineno}: not valid JSON: {exc}") from None


def _entries(stream: IO[bytes], chunk_size: int, close: bool) -> Iterator[FileEntry]:
    try:
        for lineno, line in enumerate(stream, start=2):
            if not line.strip():
                raise InvalidManifest(f"line {lineno}: blank line (JSON Lines has none)")
            obj = _parse_line(line, lineno)
            try:
                yield entry_from_dict(obj, chunk_size)
            except (InvalidManifest, InvalidPath) as exc:
                raise type(exc)(f"line {lineno}: {exc}") from None
    finally:
        if close:
            stream.close()


def read_producer_manifest(
    stream: IO[bytes] | Path,
) -> tuple[ManifestHeader, Iterator[FileEntry]]:
    """Parse the header now and return it with a lazy iterator over validated entries.

    Entries come back in file order with NFC-normalized paths. When given a ``Path``
    the file is closed once the iterator is exhausted, fails, or is closed.
    """
    close = isinstance(stream, Path)
    fh: IO[bytes] = stream.open("rb") if isinstance(stream, Path) else stream
    try:
        first = fh.readline()
        if not first.strip():
            raise InvalidManifest("line 1: missing header (expected a datasync-producer/1 object)")
        try:
            header = parse_producer_header(_parse_line(first, 1))
        except InvalidManifest as exc:
            msg = str(exc)
            raise InvalidManifest(msg if msg.startswith("line 1:") else f"line 1: {msg}") from None
    except BaseException:
        if close:
            fh.close()
        raise
    return header, _entries(fh, header.chunk_size, close)
