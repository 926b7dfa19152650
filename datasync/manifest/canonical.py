"""The canonical bytes of a manifest and the version id computed from them.

Canonical form (``datasync-manifest/1``; ``docs/manifest-format.md`` is the reference):

* UTF-8 JSON Lines, every line ending in ``\\n``, no blank lines.
* Line 1, the header: ``{"chunk_size":N,"format":"datasync-manifest/1"}``.
* Then one line per file, in strictly ascending order of the path's UTF-8 bytes (so no
  duplicates), and no file path is a directory of another (``a`` with ``a/b``). Each
  is a JSON object with sorted keys, separators ``,`` and ``:``, no ASCII escaping
  (``json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=False)``),
  keys ``path``, ``size``, ``digest`` and, only when ``size > chunk_size``, ``chunks``
  (the per-chunk digests in order).
* The version id is the lowercase sha256 hex of all those bytes, header included.

The encoders below build the lines by hand instead of calling ``json.dumps`` per entry
(several times faster at 1M entries); ``tests/unit/test_canonical.py`` pins that the bytes
equal ``json.dumps`` output.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from json.encoder import encode_basestring
from typing import IO, Any, Final

from datasync.errors import InvalidManifest, InvalidPath
from datasync.manifest.paths import normalize_path
from datasync.models import (
    MAX_CHUNK_SIZE,
    MAX_FILE_SIZE,
    MIN_CHUNK_SIZE,
    FileEntry,
    ManifestHeader,
    check_digest,
    chunk_count,
)

__all__ = [
    "MANIFEST_FORMAT",
    "FileDirClashCheck",
    "VersionIdBuilder",
    "check_chunk_size",
    "encode_entry",
    "encode_header",
    "entry_from_dict",
    "header_from_dict",
    "loads_strict",
    "path_sort_key",
    "read_canonical",
    "version_id",
    "write_canonical",
]

MANIFEST_FORMAT: Final = "datasync-manifest/1"
_ENTRY_KEYS: Final = frozenset({"path", "size", "digest", "chunks"})
_HEADER_KEYS: Final = frozenset({"chunk_size", "format"})
# Same rule as models.check_digest, inlined on the hot path (1M entries per manifest).
_digest_ok: Final = re.compile(r"xxh3-128:[0-9a-f]{32}").fullmatch


def path_sort_key(path: str) -> bytes:
    """The sort key of the canonical order: the path's UTF-8 bytes."""
    return path.encode("utf-8")


def check_chunk_size(value: object) -> int:
    """Return ``value`` if it is an allowed chunk size, else raise ``InvalidManifest``."""
    if type(value) is not int or not MIN_CHUNK_SIZE <= value <= MAX_CHUNK_SIZE:
        raise InvalidManifest(
            f"bad chunk_size {value!r}: expected an integer from {MIN_CHUNK_SIZE} "
            f"to {MAX_CHUNK_SIZE} bytes"
        )
    return value


def encode_header(h: ManifestHeader) -> bytes:
    """Line 1 of the canonical form."""
    if h.format != MANIFEST_FORMAT:
        raise InvalidManifest(f"unknown manifest format {h.format!r}; expected {MANIFEST_FORMAT}")
    check_chunk_size(h.chunk_size)
    return f'{{"chunk_size":{h.chunk_size},"format":"{MANIFEST_FORMAT}"}}\n'.encode()


def encode_entry(e: FileEntry) -> bytes:
    """One file's canonical line. ``e`` must already be valid (see ``entry_from_dict``)."""
    # Digests are validated hex, so they need no JSON escaping; the path may hold any
    # non-control character and goes through the stdlib's C string encoder.
    if e.chunks:
        chunks = '","'.join(e.chunks)
        return (
            f'{{"chunks":["{chunks}"],"digest":"{e.digest}",'
            f'"path":{encode_basestring(e.path)},"size":{e.size}}}\n'
        ).encode()
    return (
        f'{{"digest":"{e.digest}","path":{encode_basestring(e.path)},"size":{e.size}}}\n'.encode()
    )


class FileDirClashCheck:
    """Finds a file that another path of the version needs as a directory (``a`` and ``a/b``).

    No file system can hold both, and a view is a file system tree on POSIX sites, so such a
    version could never be published everywhere. Object-store keys and producer manifests
    can express it, hence this check over the canonical stream, with bounded memory.

    Why a stack suffices: in ascending byte order every path that starts with ``p`` comes
    in one contiguous run right after ``p``. The stack holds the earlier paths that are
    (string) prefixes of the current one; each is a prefix of the next, so it is at most
    one entry per byte of the longest path. A path that is no longer a prefix of the
    current one can never be a prefix of a later one, and is popped. Only the top needs
    checking: a lower entry ``f`` with ``f/`` leading the current path would have that
    same ``f/`` leading every entry above it, and those were refused when they came.
    """

    __slots__ = ("_stack",)

    def __init__(self) -> None:
        self._stack: list[bytes] = []

    def add(self, key: bytes) -> bytes | None:
        """Feed the next path (UTF-8 bytes, strictly ascending); return the earlier file
        that ``key`` lies under (``key`` starts with it plus ``/``), or None."""
        stack = self._stack
        while stack and not key.startswith(stack[-1]):
            stack.pop()
        if stack and key[len(stack[-1]) : len(stack[-1]) + 1] == b"/":
            return stack[-1]
        stack.append(key)
        return None


def _clash_error(file: str, nested: str) -> InvalidPath:
    return InvalidPath(
        f"{file!r} is a file, but {nested!r} needs {file!r} to be a directory: no file "
        "system can hold both, so the version could not be published on POSIX sites; "
        "rename or remove one of them"
    )


class VersionIdBuilder:
    """Streams entries in canonical order into sha256; ``hexdigest()`` is the version id.

    ``add`` raises ``InvalidManifest`` unless each path's UTF-8 bytes sort strictly after
    the previous one's, which also rejects duplicates and NFC twins (already normalized),
    and ``InvalidPath`` for a file that a later path needs as a directory
    (``FileDirClashCheck``). Every registration computes its id here, so every source
    gets these checks. ``files`` and ``bytes`` count what was added.
    """

    __slots__ = ("_clash", "_hash", "_last", "bytes", "chunk_size", "files")

    def __init__(self, header: ManifestHeader) -> None:
        self._hash = hashlib.sha256(encode_header(header))
        self._last: bytes | None = None
        self._clash = FileDirClashCheck()
        self.chunk_size = header.chunk_size
        self.files = 0
        self.bytes = 0

    def add(self, entry: FileEntry) -> bytes:
        """Add one entry; returns its canonical line (callers may write it out)."""
        key = entry.path.encode("utf-8")
        last = self._last
        if last is not None and key <= last:
            if key == last:
                raise InvalidManifest(f"duplicate path {entry.path!r} in manifest")
            raise InvalidManifest(
                f"manifest entries out of order: {entry.path!r} comes after "
                f"{last.decode('utf-8')!r}; entries must be sorted by UTF-8 bytes"
            )
        file = self._clash.add(key)
        if file is not None:
            raise _clash_error(file.decode("utf-8"), entry.path)
        self._last = key
        line = encode_entry(entry)
        self._hash.update(line)
        self.files += 1
        self.bytes += entry.size
        return line

    def add_all(self, entries: Iterable[FileEntry]) -> None:
        for entry in entries:
            self.add(entry)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def version_id(header: ManifestHeader, entries: Iterable[FileEntry]) -> str:
    """The id of a manifest whose entries are already in canonical order."""
    builder = VersionIdBuilder(header)
    builder.add_all(entries)
    return builder.hexdigest()


def write_canonical(header: ManifestHeader, entries: Iterable[FileEntry], out: IO[bytes]) -> str:
    """Write the canonical bytes to ``out`` and return the version id."""
    builder = VersionIdBuilder(header)
    out.write(encode_header(header))
    for entry in entries:
        out.write(builder.add(entry))
    return builder.hexdigest()


def _bad(why: str, d: object) -> InvalidManifest:
    shown = repr(d)
    if len(shown) > 200:
        shown = shown[:180] + "...(truncated)"
    return InvalidManifest(f"{why} in entry {shown}")


def entry_from_dict(d: Mapping[str, Any], chunk_size: int) -> FileEntry:
    """Validate one decoded entry object and return it as a ``FileEntry``.

    Rules (the JSON Schema's, plus what a schema cannot say): keys ``path``, ``size``,
    ``digest`` required and ``chunks`` optional, nothing else; ``path`` passes
    ``normalize_path`` (and is returned NFC-normalized); ``size`` is a JSON integer
    (not ``true``, not ``1.0``) from 0 to ``MAX_FILE_SIZE``; digests are well formed;
    ``chunks``, when present or required, has exactly ``chunk_count(size, chunk_size)``
    digests (absent or ``[]`` for files of at most ``chunk_size`` bytes).
    Raises ``InvalidManifest`` or ``InvalidPath``.
    """
    if type(d) is not dict and not isinstance(d, Mapping):
        raise InvalidManifest(f"expected a JSON object per file, got {type(d).__name__}")
    if not _ENTRY_KEYS.issuperset(d):
        extra = sorted(str(k) for k in d if k not in _ENTRY_KEYS)
        raise _bad(f"unknown key(s) {extra} (allowed: chunks, digest, path, size)", d)
    try:
        raw_path = d["path"]
        size = d["size"]
        digest = d["digest"]
    except KeyError as exc:
        raise _bad(f"missing required key {exc.args[0]!r}", d) from None
    path = normalize_path(raw_path)
    if type(size) is not int:
        raise _bad(f"size must be an integer number of bytes, got {size!r}", d)
    if not 0 <= size <= MAX_FILE_SIZE:
        raise _bad(f"size {size} is outside 0..{MAX_FILE_SIZE} (5 TiB)", d)
    if type(digest) is not str:
        raise _bad(f"digest must be a string, got {digest!r}", d)
    if _digest_ok(digest) is None:
        check_digest(digest)  # raises with the standard message
    want = chunk_count(size, chunk_size)
    raw_chunks = d.get("chunks")
    if raw_chunks is None:
        if "chunks" in d:
            raise _bad("chunks must be a list of digests, got null", d)
        if want:
            raise _bad(
                f"{path!r} is {size} bytes, larger than chunk_size {chunk_size}, "
                f"so it needs 'chunks' with {want} digests",
                d,
            )
        return FileEntry(path, size, digest)
    if type(raw_chunks) is not list:
        raise _bad(f"chunks must be a list of digests, got {type(raw_chunks).__name__}", d)
    for c in raw_chunks:
        if type(c) is not str:
            raise _bad(f"chunk digest must be a string, got {c!r}", d)
        if _digest_ok(c) is None:
            check_digest(c)
    if len(raw_chunks) != want:
        raise _bad(
            f"{path!r} has {len(raw_chunks)} chunk digests; a {size}-byte file with "
            f"chunk_size {chunk_size} has {want}",
            d,
        )
    return FileEntry(path, size, digest, tuple(raw_chunks))


def header_from_dict(d: Mapping[str, Any], *, fmt: str = MANIFEST_FORMAT) -> ManifestHeader:
    """Validate a decoded canonical header (``fmt`` is the expected format string)."""
    if not isinstance(d, Mapping):
        raise InvalidManifest(f"header must be a JSON object, got {type(d).__name__}")
    if not _HEADER_KEYS.issuperset(d):
        extra = sorted(str(k) for k in d if k not in _HEADER_KEYS)
        raise InvalidManifest(f"unknown header key(s) {extra} (allowed: chunk_size, format)")
    if d.get("format") != fmt:
        raise InvalidManifest(f"header format is {d.get('format')!r}; expected {fmt!r}")
    if "chunk_size" not in d:
        raise InvalidManifest("header is missing 'chunk_size'")
    return ManifestHeader(chunk_size=check_chunk_size(d["chunk_size"]))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# One decoder instance: json.loads(..., parse_constant=) would build a new one per call.
_strict_decoder = json.JSONDecoder(parse_constant=_reject_constant)
# The C scanner ``decode`` wraps (an instance attribute typeshed does not declare).
_scan_once: Callable[[str, int], tuple[Any, int]] = vars(_strict_decoder)["scan_once"]
_JSON_WHITESPACE: Final = " \t\n\r"


def loads_strict(line: bytes | str) -> Any:
    """``json.loads`` without the NaN/Infinity extensions (they are not JSON).

    Raises ``ValueError`` (``UnicodeDecodeError`` for bad UTF-8, ``JSONDecodeError``, and
    for arrays or objects nested too deeply for the decoder's recursion).
    """
    text = line.decode("utf-8") if isinstance(line, bytes) else line
    # Fast path: the C scanner directly (``decode`` wraps it in two regex calls, ~2 us a
    # line at 1M lines). Anything unusual goes through ``decode`` for its exact error.
    try:
        try:
            obj, end = _scan_once(text, 0)
        except StopIteration:
            return _strict_decoder.decode(text)
        if end != len(text) and text[end:].strip(_JSON_WHITESPACE):
            return _strict_decoder.decode(text)
    except RecursionError:  # "[[[[..." : hostile input, not a crash
        raise ValueError("arrays or objects nested too deeply") from None
    return obj


def read_canonical(stream: IO[bytes]) -> tuple[ManifestHeader, Iterator[FileEntry]]:
    """Parse canonical bytes back, checking every line is byte-for-byte canonical.

    Ordering and duplicates are checked as entries are consumed; the iterator raises
    ``InvalidManifest`` naming the line number.
    """
    first = stream.readline()
    try:
        header = header_from_dict(loads_strict(first))
    except ValueError as exc:
        raise InvalidManifest(f"line 1: not valid JSON: {exc}") from None
    except InvalidManifest as exc:
        raise InvalidManifest(f"line 1: {exc}") from None
    if encode_header(header) != first:
        raise InvalidManifest("line 1: header is not in canonical form")

    def entries() -> Iterator[FileEntry]:
        builder = VersionIdBuilder(header)
        for lineno, line in enumerate(stream, start=2):
            try:
                entry = entry_from_dict(loads_strict(line), header.chunk_size)
                if builder.add(entry) != line:
                    raise InvalidManifest("line is not in canonical form")
            except ValueError as exc:
                raise InvalidManifest(f"line {lineno}: not valid JSON: {exc}") from None
            except (InvalidManifest, InvalidPath) as exc:
                raise type(exc)(f"line {lineno}: {exc}") from None
            yield entry

    return header, entries()
