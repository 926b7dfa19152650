"""The service layer: the one set of operations the CLI, the HTTP API and the tests call.

Each method validates its input before touching anything, delegates to the manifest
core (scan, producer manifests) and the store, and returns pydantic models that serialise
to the JSON both interfaces print. Raises only ``DatasyncError`` subclasses.

Registration follows one policy for every source: ``manifest.remote`` decides which
scanner reads it (a local tree, ``SITE:path`` on a POSIX site included, goes through
``scan_directory``; an object-store prefix through ``cloudscan``) and checks the source
string. The scan is *spooled* to a temporary file through a ``VersionIdBuilder`` (order,
duplicates, a file that is also a directory) and only then is the database transaction
opened: hashing a large tree can take hours, and an SQLite write lock must not be held
that long. A scan error therefore changes nothing at all.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from pydantic import BaseModel

from datasync.config import Settings
from datasync.errors import InvalidManifest, UserError
from datasync.events import EventBus, LabelMoved, VersionRegistered
from datasync.manifest.canonical import (
    MANIFEST_FORMAT,
    VersionIdBuilder,
    entry_from_dict,
    loads_strict,
    read_canonical,
)
from datasync.manifest.diff import Change
from datasync.manifest.paths import INTERNAL_DIR
from datasync.manifest.producer import read_producer_manifest
from datasync.manifest.refs import check_dataset_name, check_label
from datasync.manifest.remote import (
    LocalTree,
    RemoteSources,
    RemoteTree,
    is_remote_source,
    parse_source,
    skips_internal_dir,
)
from datasync.manifest.scan import scan_directory, scan_total
from datasync.manifest.statcache import StatCache
from datasync.manifest.store import ManifestStore, Registration
from datasync.models import (
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    FileEntry,
    ManifestHeader,
    VersionSummary,
)

__all__ = [
    "ChangeInfo",
    "DatasyncService",
    "DiffResult",
    "ExportResult",
    "FileInfo",
    "Progress",
    "RegisterResult",
    "VersionInfo",
    "is_remote_source",
]


class VersionInfo(BaseModel):
    dataset: str
    version_id: str
    files: int
    bytes: int
    chunk_size: int
    created_at: str
    labels: list[str]
    verified: bool

    @classmethod
    def of(cls, summary: VersionSummary) -> VersionInfo:
        return cls(
            dataset=summary.dataset,
            version_id=summary.version_id,
            files=summary.files,
            bytes=summary.bytes,
            chunk_size=summary.chunk_size,
            created_at=summary.created_at,
            labels=list(summary.labels),
            verified=summary.verified,
        )

    @property
    def ref(self) -> str:
        return f"{self.dataset}@{self.version_id}"


class RegisterResult(VersionInfo):
    created: bool

    @classmethod
    def of_registration(cls, reg: Registration) -> RegisterResult:
        return cls(**VersionInfo.of(reg.summary).model_dump(), created=reg.created)


class FileInfo(BaseModel):
    path: str
    size: int
    digest: str
    chunks: list[str] = []


class ChangeInfo(BaseModel):
    path: str
    old_size: int | None = None
    old_digest: str | None = None
    new_size: int | None = None
    new_digest: str | None = None


class DiffResult(BaseModel):
    old: VersionInfo
    new: VersionInfo
    added: list[ChangeInfo]
    removed: list[ChangeInfo]
    changed: list[ChangeInfo]


class ExportResult(BaseModel):
    version: VersionInfo
    bytes_written: int


class Progress(Protocol):
    """What a progress display needs; the CLI implements it with rich."""

    def start(self, files: int, nbytes: int) -> None: ...

    def update(self, files_done: int, bytes_done: int) -> None:
        """Cumulative counts so far (called from the registering thread)."""
        ...

    def finish(self) -> None: ...


class DatasyncService:
    """Operations on datasets and versions. Built once by ``datasync.bootstrap``."""

    def __init__(
        self,
        settings: Settings,
        store: ManifestStore,
        stat_cache: StatCache | None,
        remote_sources: RemoteSources | None,
        bus: EventBus,
    ) -> None:
        self.settings = settings
        self.store = store
        self.stat_cache = stat_cache
        self.remote_sources = remote_sources
        self.bus = bus

    def _registered(self, reg: Registration, source: str, verified: bool) -> RegisterResult:
        self.bus.emit(
            VersionRegistered(
                dataset=reg.summary.dataset,
                version_id=reg.summary.version_id,
                source=source,
                verified=verified,
                created=reg.created,
            )
        )
        return RegisterResult.of_registration(reg)

    # ------------------------------------------------------------ registration

    def register(
        self,
        dataset: str,
        source: str,
        *,
        label: str | None = None,
        chunk_size: int | None = None,
        manifest: bool | None = None,
        progress: Progress | None = None,
        allow_empty: bool = False,
    ) -> RegisterResult:
        """Register ``source``: a producer manifest file, a local directory, ``SITE:path``
        or a URL, each under the one scanner policy of ``manifest.remote``.

        ``manifest=None`` detects a producer manifest by its ``.jsonl`` suffix. A source
        with no files (an empty or unmounted directory, an empty prefix) is refused unless
        ``allow_empty``: it would register a 0-file version and move ``latest`` to it.
        """
        check_dataset_name(dataset)
        labels = [check_label(label)] if label is not None else []
        tree = parse_source(self.settings, source)
        if tree is None:  # a plain local path
            path = Path(source).expanduser()
            if manifest is None:
                manifest = path.suffix.lower() in {".jsonl", ".ndjson"} and not path.is_dir()
            if manifest:
                if chunk_size is not None:
                    raise UserError("--chunk-size does not apply to a producer manifest")
                return self.register_manifest(dataset, path, label=label, allow_empty=allow_empty)
            tree = LocalTree(path)
        chunk = self._chunk_size(chunk_size)
        return self._register_tree(dataset, tree, labels, chunk, progress, allow_empty)

    def register_directory(
        self,
        dataset: str,
        path: Path | str,
        *,
        label: str | None = None,
        chunk_size: int | None = None,
        progress: Progress | None = None,
        allow_empty: bool = False,
    ) -> RegisterResult:
        """Hash a directory on this host, or ``SITE:path`` of a configured site, and
        register it as a verified version (as ``register`` would).

        URLs are not taken here: the HTTP API calls this, and an API client must not make
        the server fetch arbitrary URLs. A URL string is taken as a (missing) local path.
        """
        check_dataset_name(dataset)
        labels = [check_label(label)] if label is not None else []
        chunk = self._chunk_size(chunk_size)
        tree = parse_source(self.settings, path, urls=False) if isinstance(path, str) else None
        local = tree or LocalTree(Path(path))
        return self._register_tree(dataset, local, labels, chunk, progress, allow_empty)

    def register_manifest(
        self,
        dataset: str,
        jsonl_path: Path | str,
        *,
        label: str | None = None,
        allow_empty: bool = False,
    ) -> RegisterResult:
        """Register a producer-supplied JSON Lines manifest without re-hashing.

        Also accepts a canonical manifest (``datasync export`` output). The version is
        stored unverified until a transfer hashes its bytes.
        """
        check_dataset_name(dataset)
        labels = [check_label(label)] if label is not None else []
        path = Path(jsonl_path).expanduser()
        if not path.is_file():
            raise UserError(f"{jsonl_path}: no such manifest file")
        with path.open("rb") as stream:
            header, entries = _read_manifest(stream)
            source = f"manifest:{path}"
            entries = _refuse_empty(entries, str(jsonl_path), allow_empty)
            reg = self.store.register(
                dataset, header, entries, labels=labels, verified=False, source=source
            )
        return self._registered(reg, source, verified=False)

    def _register_tree(
        self,
        dataset: str,
        tree: LocalTree | RemoteTree,
        labels: list[str],
        chunk: int,
        progress: Progress | None,
        allow_empty: bool,
    ) -> RegisterResult:
        """Local trees through ``scan_directory`` (recorded as ``directory:/real/path``),
        object-store prefixes through ``cloudscan``; a site root's ``.datasync/`` is never
        scanned."""
        if isinstance(tree, RemoteTree):
            if self.remote_sources is None:
                raise UserError(f"{tree.record}: registering from remote sources is not configured")
            remote = self.remote_sources

            def scan_remote(on_progress: Callable[[int, int], None] | None) -> Iterator[FileEntry]:
                return remote.scan(tree, chunk, on_progress)

            # Totals are unknown until the listing ends.
            return self._register_scanned(
                dataset, chunk, labels, scan_remote, progress, (0, 0), tree.record, allow_empty
            )
        root = tree.resolve()
        source = f"directory:{root}"
        exclude = (INTERNAL_DIR,) if skips_internal_dir(self.settings, source) else ()

        def scan(on_progress: Callable[[int, int], None] | None) -> Iterator[FileEntry]:
            return scan_directory(
                root,
                chunk_size=chunk,
                workers=self.settings.hash_workers,
                stat_cache=self.stat_cache,
                on_progress=on_progress,
                exclude=exclude,
            )

        totals = scan_total(root, exclude) if progress is not None else (0, 0)
        return self._register_scanned(
            dataset, chunk, labels, scan, progress, totals, source, allow_empty
        )

    def _register_scanned(
        self,
        dataset: str,
        chunk: int,
        labels: list[str],
        scan: Callable[[Callable[[int, int], None] | None], Iterator[FileEntry]],
        progress: Progress | None,
        totals: tuple[int, int],
        source: str,
        allow_empty: bool,
    ) -> RegisterResult:
        """Hash into a spool file first, then register from it: hashing a big tree or
        bucket takes hours, and the database write lock must not be held that long.

        The spool is written through a ``VersionIdBuilder`` so that what the store would
        refuse (a file that is also a directory, a duplicate) stops the scan when it shows
        up, not after hours of hashing."""
        with self.spool() as spool:
            if progress is not None:
                progress.start(*totals)
            checker = VersionIdBuilder(ManifestHeader(chunk_size=chunk))
            for entry in scan(progress.update if progress is not None else None):
                spool.write(checker.add(entry))
            if progress is not None:
                progress.finish()
            if not checker.files and not allow_empty:
                where = source.removeprefix("directory:")
                raise UserError(
                    f"{where}: no files to register (an empty directory or prefix, or a file"
                    " system that is not mounted?); --allow-empty registers it anyway"
                )
            spool.flush()
            spool.seek(0)
            reg = self.store.register(
                dataset,
                ManifestHeader(chunk_size=chunk),
                _read_spool(spool, chunk),
                labels=labels,
                verified=True,
                source=source,
                version_id=checker.hexdigest(),  # unchanged content: the spool is not read
            )
        return self._registered(reg, source, verified=True)

    # ------------------------------------------------------------------ reading

    def list_datasets(self) -> list[str]:
        return self.store.list_datasets()

    def list_versions(self, dataset: str) -> list[VersionInfo]:
        return [VersionInfo.of(s) for s in self.store.list_versions(dataset)]

    def show(self, ref: str) -> VersionInfo:
        return VersionInfo.of(self.store.resolve(ref))

    def iter_files(self, ref: str) -> Iterator[FileInfo]:
        """Stream the files of ``ref`` in canonical order (resolution errors raise first)."""
        summary = self.store.resolve(ref)
        return (
            FileInfo(path=e.path, size=e.size, digest=e.digest, chunks=list(e.chunks))
            for e in self.store.iter_entries(summary)
        )

    def diff(self, ref_a: str, ref_b: str) -> DiffResult:
        """Changes from ``ref_a`` to ``ref_b`` (any two versions, even of two datasets).

        Memory grows with the number of changes only, never with the manifest sizes.
        """
        old, new = self.store.resolve(ref_a), self.store.resolve(ref_b)
        buckets: dict[str, list[ChangeInfo]] = {"added": [], "removed": [], "changed": []}
        for change in self.store.diff(old, new):
            buckets[change.kind].append(_change_info(change))
        return DiffResult(
            old=VersionInfo.of(old),
            new=VersionInfo.of(new),
            added=buckets["added"],
            removed=buckets["removed"],
            changed=buckets["changed"],
        )

    def set_label(self, ref: str, label: str) -> VersionInfo:
        info = VersionInfo.of(self.store.set_label(ref, label))
        self.bus.emit(LabelMoved(dataset=info.dataset, label=label, version_id=info.version_id))
        return info

    def export(self, ref: str, out: BinaryIO) -> ExportResult:
        summary = self.store.resolve(ref)
        written = self.store.export(summary, out)
        return ExportResult(version=VersionInfo.of(summary), bytes_written=written)

    def export_stream(self, ref: str) -> tuple[VersionInfo, Iterator[bytes]]:
        """Resolve now (so errors surface before streaming) and return the lines lazily."""
        summary = self.store.resolve(ref)
        return VersionInfo.of(summary), self.store.iter_manifest(summary)

    # ------------------------------------------------------------------ helpers

    def _chunk_size(self, chunk_size: int | None) -> int:
        chunk = self.settings.chunk_size if chunk_size is None else chunk_size
        if not MIN_CHUNK_SIZE <= chunk <= MAX_CHUNK_SIZE:
            raise UserError(
                f"chunk size {chunk} out of range: {MIN_CHUNK_SIZE} (1 MiB) to "
                f"{MAX_CHUNK_SIZE} (4 GiB)"
            )
        return chunk

    def spool(self) -> tempfile._TemporaryFileWrapper[bytes]:
        """A temporary file in ``$DATASYNC_HOME/tmp`` for a scan or an upload, deleted on
        close: registration reads from it, so no database lock waits on the network."""
        spool_dir = self.settings.home / "tmp"
        spool_dir.mkdir(parents=True, exist_ok=True)
        return tempfile.NamedTemporaryFile(dir=spool_dir, prefix="scan-", suffix=".jsonl")


def _read_manifest(stream: BinaryIO) -> tuple[ManifestHeader, Iterator[FileEntry]]:
    """A producer manifest (any order), or a canonical one as ``datasync export`` writes."""
    first = stream.readline()
    stream.seek(0)
    try:
        is_canonical = loads_strict(first).get("format") == MANIFEST_FORMAT
    except (ValueError, AttributeError):
        is_canonical = False  # the producer reader reports what is wrong with line 1
    return read_canonical(stream) if is_canonical else read_producer_manifest(stream)


def _refuse_empty(
    entries: Iterator[FileEntry], where: str, allow_empty: bool
) -> Iterator[FileEntry]:
    """``entries`` unchanged, or ``UserError`` before anything is written when it is empty."""
    first = next(entries, None)
    if first is None:
        if not allow_empty:
            raise UserError(
                f"{where}: the manifest lists no files; --allow-empty registers it anyway"
            )
        return iter(())
    return itertools.chain((first,), entries)


def _read_spool(spool: Iterable[bytes], chunk_size: int) -> Iterator[FileEntry]:
    for line in spool:
        try:
            yield entry_from_dict(json.loads(line), chunk_size)
        except ValueError as exc:  # pragma: no cover - we wrote the file ourselves
            raise InvalidManifest(f"corrupt scan spool: {exc}") from exc


def _change_info(change: Change) -> ChangeInfo:
    return ChangeInfo(
        path=change.path,
        old_size=change.old_size,
        old_digest=change.old_digest,
        new_size=change.new_size,
        new_digest=change.new_digest,
    )
