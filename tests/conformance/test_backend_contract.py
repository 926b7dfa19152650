"""The backend contract (``datasync/backends/base.py``), checked against every backend.

Each test takes the ``backend`` (or ``make_backend``) fixture and so runs once per kind:
memory, posix, s3 (moto), azure (Azurite), gcs (emulator). Abilities a backend does not
declare are not skipped: the test asserts that using them raises ``Unsupported`` (or that
the optional method is absent), which is a claim that can fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import xxhash

from datasync.backends.base import (
    Backend,
    ObjectInfo,
    PartLayout,
    SupportsLink,
    SupportsRename,
    read_range_into,
)
from datasync.backends.memory import MemoryBackend, drop_store
from datasync.backends.registry import redact
from datasync.backends.retrying import RetryingBackend
from datasync.errors import (
    InvalidPath,
    NotFound,
    PermissionDenied,
    SourceChanged,
    Throttled,
    TransientError,
    Unsupported,
)
from datasync.retry import RetryEvent, RetryPolicy
from tests.conformance.conftest import POSIX_KINDS, MakeBackend

KiB = 1024
MiB = 1024 * KiB


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def part_size_for(backend: Backend, wanted: int) -> int:
    return max(wanted, backend.capabilities.min_part_size)


def put(backend: Backend, key: str, data: bytes, part_size: int | None = None) -> ObjectInfo:
    """Write ``data`` at ``key`` through the chunked writer, parts in order."""
    ps = part_size or max(len(data), 1)
    layout = PartLayout(len(data), ps)
    writer = backend.begin(key, len(data), ps)
    for i in range(layout.count):
        writer.put_part(i, data[layout.offset(i) : layout.offset(i) + layout.length(i)])
    return writer.commit()


def read_all(backend: Backend, key: str) -> bytes:
    return backend.read_range(key, 0, backend.stat(key).size + 1)


def keys(infos: Iterator[ObjectInfo]) -> list[str]:
    return [info.key for info in infos]


# -- stat, read ---------------------------------------------------------------------------


def test_capabilities_are_consistent(backend: Backend) -> None:
    caps = backend.capabilities
    assert 1 <= caps.min_part_size <= caps.max_part_size
    assert caps.max_parts >= 1
    assert backend.url and redact(backend.url) == backend.url  # no secrets in the URL


def test_stat_missing_key_is_not_found(backend: Backend) -> None:
    """Invariant 7: a missing object is a permanent ``NotFound``."""
    with pytest.raises(NotFound) as caught:
        backend.stat("no/such/key")
    assert not caught.value.retryable
    with pytest.raises(NotFound):
        backend.read_range("no/such/key", 0, 10)


def test_stat_reports_size_and_version(backend: Backend) -> None:
    data = payload(1, 1000)
    committed = put(backend, "dir/obj.bin", data)
    info = backend.stat("dir/obj.bin")
    assert (info.key, info.size) == ("dir/obj.bin", 1000)
    assert info.etag
    assert committed.size == 1000 and committed.etag == info.etag


def test_ranged_reads(backend: Backend) -> None:
    data = payload(2, 3 * 4096 + 123)
    put(backend, "ranges.bin", data)
    size = len(data)
    assert backend.read_range("ranges.bin", 0, size) == data
    assert backend.read_range("ranges.bin", 0, 10 * size) == data
    assert backend.read_range("ranges.bin", 4096, 4096) == data[4096:8192]
    assert backend.read_range("ranges.bin", 4000, 200) == data[4000:4200]  # crosses a chunk
    # the last partial chunk: ask for a whole chunk, get what is left
    assert backend.read_range("ranges.bin", 3 * 4096, 4096) == data[3 * 4096 :]
    assert backend.read_range("ranges.bin", size - 1, 4096) == data[-1:]
    assert backend.read_range("ranges.bin", size, 4096) == b""
    assert backend.read_range("ranges.bin", 5, 0) == b""


def test_zero_byte_object(backend: Backend) -> None:
    writer = backend.begin("empty", 0, part_size_for(backend, 1 * MiB))
    assert writer.durable_parts() == set()
    info = writer.commit()
    assert info.size == 0
    assert backend.stat("empty").size == 0
    assert backend.read_range("empty", 0, 4096) == b""
    assert keys(backend.list("emp")) == ["empty"]


def test_read_range_into_fills_a_reused_buffer(backend: Backend) -> None:
    data = payload(3, 10_000)
    put(backend, "into.bin", data)
    buf = bytearray(4096)
    got = bytearray()
    offset = 0
    while True:
        n = read_range_into(backend, "into.bin", offset, buf)
        if n == 0:
            break
        got += buf[:n]
        offset += n
    assert bytes(got) == data
    assert read_range_into(backend, "into.bin", len(data) - 5, memoryview(buf)) == 5
    assert bytes(buf[:5]) == data[-5:]


def test_read_pinned_to_version(backend: Backend) -> None:
    """Invariant 7: a changed source is a permanent ``SourceChanged``, never mixed bytes."""
    put(backend, "pinned", b"first version")
    old = backend.stat("pinned")
    assert backend.read_range("pinned", 0, 5, etag=old.etag) == b"first"
    put(backend, "pinned", b"second version, longer")
    new = backend.stat("pinned")
    assert new.etag != old.etag
    assert backend.read_range("pinned", 0, 6, etag=new.etag) == b"second"
    if backend.capabilities.conditional_read:
        with pytest.raises(SourceChanged) as caught:
            backend.read_range("pinned", 0, 5, etag=old.etag)
        assert not caught.value.retryable


# -- writes -------------------------------------------------------------------------------


def test_nothing_visible_before_commit(backend: Backend) -> None:
    """Invariant 2: no byte is published at a key before the writer commits."""
    data = payload(4, 3000)
    ps = part_size_for(backend, 1024)
    layout = PartLayout(len(data), ps)
    writer = backend.begin("pending/obj", len(data), ps)
    for i in range(layout.count):
        writer.put_part(i, data[layout.offset(i) : layout.offset(i) + layout.length(i)])
    with pytest.raises(NotFound):
        backend.stat("pending/obj")
    assert keys(backend.list("")) == []
    info = writer.commit()
    assert info.size == len(data)
    assert keys(backend.list("")) == ["pending/obj"]
    assert read_all(backend, "pending/obj") == data


def test_abort_leaves_nothing(backend: Backend) -> None:
    ps = part_size_for(backend, 1024)
    size = 2 * ps + 10
    writer = backend.begin("aborted/obj", size, ps)
    writer.put_part(1, payload(5, ps))
    writer.put_part(2, b"x" * 10)
    token = writer.token
    writer.abort()
    writer.abort()  # twice is fine
    with pytest.raises(NotFound):
        backend.stat("aborted/obj")
    assert keys(backend.list("")) == []
    # The upload is gone: resuming it must not silently start from zeros.
    try:
        resumed = backend.begin("aborted/obj", size, ps, token=token)
    except NotFound:
        pass
    else:
        assert backend.capabilities.lists_parts, "resume of an aborted upload must be NotFound"
        assert resumed.durable_parts() == set()
        resumed.abort()


def test_parallel_out_of_order_parts(backend: Backend) -> None:
    ps = part_size_for(backend, 256 * KiB)
    size = 6 * ps + 777
    layout = PartLayout(size, ps)
    order = list(range(layout.count))
    random.Random(6).shuffle(order)
    writer = backend.begin("parallel.bin", size, ps)

    def part(i: int) -> bytes:
        return payload(1000 + i, layout.length(i))

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda i: writer.put_part(i, memoryview(part(i))), order))
    info = writer.commit()
    expected = b"".join(part(i) for i in range(layout.count))
    assert info.size == size
    assert xxhash.xxh3_128(read_all(backend, "parallel.bin")).hexdigest() == (
        xxhash.xxh3_128(expected).hexdigest()
    )


def test_resume_with_token(backend: Backend) -> None:
    """Invariant 4: a worker that dies mid-upload loses nothing; another one finishes it."""
    ps = part_size_for(backend, 64 * KiB)
    size = 3 * ps + 99
    layout = PartLayout(size, ps)
    data = payload(7, size)

    def chunk(i: int) -> bytes:
        return data[layout.offset(i) : layout.offset(i) + layout.length(i)]

    first = backend.begin("resumed.bin", size, ps)
    first.put_part(0, chunk(0))
    first.put_part(2, chunk(2))
    token = first.token  # the first worker dies here, without commit or abort

    second = backend.begin("resumed.bin", size, ps, token=token)
    assert second.token == token
    durable = second.durable_parts()
    if backend.capabilities.lists_parts:
        assert durable == {0, 2}
    else:
        assert durable == set()  # the engine's own chunk map is authoritative
    for i in (1, 3):
        second.put_part(i, chunk(i))
    with pytest.raises(NotFound):
        backend.stat("resumed.bin")
    second.commit()
    assert read_all(backend, "resumed.bin") == data


@pytest.mark.parametrize("parts", [1, 3])
def test_a_commit_is_verified_only_when_this_writer_sent_every_part(
    backend: Backend, parts: int
) -> None:
    """Invariant 2 ("Verified writes" in ``base.py``): ``commit()`` says ``verified`` where
    the backend declares ``verified_writes`` and this writer sent every part, never after
    a resume whose earlier parts another writer sent without handing on their proofs
    (``SupportsPartProofs``, ``test_optional_protocols.py``; the executor then re-reads)."""
    ps = part_size_for(backend, 64 * KiB)
    size = parts * ps - 7 if parts > 1 else 1000
    layout = PartLayout(size, ps)
    data = payload(31 + parts, size)

    def chunk(i: int) -> bytes:
        return data[layout.offset(i) : layout.offset(i) + layout.length(i)]

    writer = backend.begin("verified.bin", size, ps)
    for i in reversed(range(layout.count)):
        writer.put_part(i, chunk(i))
    info = writer.commit()
    assert info.verified == backend.capabilities.verified_writes
    stat = backend.stat("verified.bin")
    assert (info.key, info.size, info.etag) == (stat.key, stat.size, stat.etag)
    assert not stat.verified  # only a commit can say it
    assert read_all(backend, "verified.bin") == data
    if parts == 1:
        return
    first = backend.begin("resumed-unverified.bin", size, ps)
    first.put_part(0, chunk(0))
    second = backend.begin("resumed-unverified.bin", size, ps, token=first.token)
    for i in range(1, layout.count):
        second.put_part(i, chunk(i))
    assert second.commit().verified is False
    assert read_all(backend, "resumed-unverified.bin") == data


def test_part_length_is_checked(backend: Backend) -> None:
    ps = part_size_for(backend, 1024)
    writer = backend.begin("strict", 2 * ps + 1, ps)
    try:
        with pytest.raises(ValueError):
            writer.put_part(0, b"short")
        with pytest.raises(ValueError):
            writer.put_part(3, b"x")  # past the last part
        with pytest.raises(ValueError):
            writer.put_part(2, b"xx")  # the last part holds one byte
    finally:
        writer.abort()


def test_overwrite_replaces_whole_object(backend: Backend) -> None:
    ps = part_size_for(backend, 1024)
    old = payload(8, 2 * ps + 5)
    put(backend, "over", old, ps)
    new = payload(9, 100)
    writer = backend.begin("over", len(new), ps)
    writer.put_part(0, new)
    assert read_all(backend, "over") == old  # the old object stays until commit
    writer.commit()
    assert backend.stat("over").size == 100
    assert read_all(backend, "over") == new
    assert keys(backend.list("over")) == ["over"]


def test_delete_is_idempotent(backend: Backend) -> None:
    backend.delete("never/existed")
    put(backend, "gone", b"bytes")
    backend.delete("gone")
    with pytest.raises(NotFound):
        backend.stat("gone")
    backend.delete("gone")
    assert keys(backend.list("")) == []


def _open_sockets() -> int:
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        # A descriptor may close while we look (the listing's own, or another thread's).
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts sockets via /proc")
def test_close_releases_connections(make_backend: MakeBackend) -> None:
    """``close()`` closes the backend's pooled connections (long-lived workers reopen sites).
    Counted after the factory ran: its admin client may keep a connection of its own."""
    backend = make_backend()
    before = _open_sockets()
    put(backend, "k", b"bytes")
    assert read_all(backend, "k") == b"bytes"
    assert keys(backend.list("")) == ["k"]
    backend.close()
    assert _open_sockets() <= before


# -- keys and listing ---------------------------------------------------------------------

ODD_KEYS = [
    "with space.txt",
    "per%cent%20.bin",
    "plus+sign+.dat",
    "ünïcødé/日本語 ファイル.bin",
    "mixed dir/a+b%c d/€.txt",
    "emoji/🚀.json",
]


def test_keys_with_odd_characters(backend: Backend) -> None:
    for i, key in enumerate(ODD_KEYS):
        put(backend, key, f"content {i}".encode())
    assert keys(backend.list("")) == sorted(ODD_KEYS)
    for i, key in enumerate(ODD_KEYS):
        assert backend.stat(key).key == key
        assert read_all(backend, key) == f"content {i}".encode()
    assert keys(backend.list("ünïcødé/")) == ["ünïcødé/日本語 ファイル.bin"]
    assert keys(backend.list("per%")) == ["per%cent%20.bin"]
    for key in ODD_KEYS:
        backend.delete(key)
    assert keys(backend.list("")) == []


@pytest.mark.parametrize(
    "bad", ["", "/abs", "a/../b", "..", "../up", "a//b", "./a", "a/.", "back\\slash", "nl\nkey"]
)
def test_unsafe_keys_are_rejected(backend: Backend, bad: str) -> None:
    """Invariant 8: keys that could escape the root are refused on every backend."""
    with pytest.raises(InvalidPath):
        backend.stat(bad)
    with pytest.raises(InvalidPath):
        backend.begin(bad, 1, 1)
    with pytest.raises(InvalidPath):
        backend.delete(bad)


def test_list_is_prefix_filtered_and_ordered(backend: Backend) -> None:
    names = ["a/1", "a/2", "a/sub/3", "a-b", "ab/4", "b", "a.txt"]
    for name in names:
        put(backend, name, name.encode())
    assert keys(backend.list("")) == sorted(names)
    assert keys(backend.list("a/")) == ["a/1", "a/2", "a/sub/3"]
    assert keys(backend.list("a")) == sorted(n for n in names if n.startswith("a"))
    assert keys(backend.list("a/s")) == ["a/sub/3"]
    assert keys(backend.list("zzz")) == []
    assert keys(backend.list("a/1")) == ["a/1"]
    sizes = {info.key: info.size for info in backend.list("")}
    assert sizes == {name: len(name) for name in names}


def test_listing_paginates_past_1000_keys(backend: Backend) -> None:
    names = [f"many/{i // 100:02d}/{i:04d}" for i in range(1100)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda n: put(backend, n, n[-4:].encode()), names))
    listed = keys(backend.list("many/"))
    assert len(listed) == 1100
    assert listed == sorted(names)
    assert keys(backend.list("many/05/")) == names[500:600]
    assert len(keys(backend.list("many/1"))) == 100  # many/10/...
    assert len(keys(backend.list(""))) == 1100


# -- server-side operations ---------------------------------------------------------------


def test_server_side_copy_where_declared(backend: Backend) -> None:
    data = payload(10, 5000)
    put(backend, "src/orig", data)
    if not backend.capabilities.server_side_copy:
        with pytest.raises(Unsupported):
            backend.copy("src/orig", "dst/copy")
        return
    info = backend.copy("src/orig", "dst/copy")
    seen = backend.stat("dst/copy")
    assert info.size == seen.size == len(data) and info.etag == seen.etag
    assert read_all(backend, "dst/copy") == data
    recorded = backend.stat("src/orig")
    again = backend.copy("src/orig", "dst/again", source=recorded)  # pinned, no stat
    assert again.size == len(data) and read_all(backend, "dst/again") == data
    put(backend, "src/orig", b"changed")  # the copy is independent of its source
    # moto 5.2 ignores x-amz-copy-source-if-match (AWS enforces it; views re-hash every
    # copy, so a copy of another version is caught there too).
    inner = backend.unwrap() if isinstance(backend, RetryingBackend) else backend
    moto = type(inner).__name__ == "S3Backend"
    if backend.capabilities.conditional_read and not moto:  # the store enforces pins
        with pytest.raises(SourceChanged):
            backend.copy("src/orig", "dst/stale", source=recorded)
        with pytest.raises(NotFound):
            backend.stat("dst/stale")
    backend.delete("src/orig")
    assert read_all(backend, "dst/copy") == data
    with pytest.raises(NotFound):
        backend.copy("src/missing", "dst/never")
    with pytest.raises(NotFound):
        backend.stat("dst/never")


def test_rename_where_declared(backend: Backend) -> None:
    put(backend, "r/old", b"moving")
    if not backend.capabilities.atomic_rename:
        if isinstance(backend, SupportsRename):
            with pytest.raises(Unsupported):
                backend.rename("r/old", "r/new")
        return
    assert isinstance(backend, SupportsRename)
    put(backend, "r/new", b"replaced")
    assert backend.rename("r/old", "r/new").size == len(b"moving")
    assert read_all(backend, "r/new") == b"moving"
    with pytest.raises(NotFound):
        backend.stat("r/old")
    with pytest.raises(NotFound):
        backend.rename("r/old", "r/other")


def test_link_where_declared(backend: Backend) -> None:
    put(backend, "l/blob", b"shared bytes")
    if not backend.capabilities.hard_links:
        if isinstance(backend, SupportsLink):
            with pytest.raises(Unsupported):
                backend.link("l/blob", "l/view")
        return
    assert isinstance(backend, SupportsLink)
    put(backend, "views/v1/file", b"old")
    backend.link("l/blob", "views/v1/file")  # replaces an existing key
    backend.link("l/blob", "views/v1/file")  # linking again is harmless
    assert read_all(backend, "views/v1/file") == b"shared bytes"
    assert keys(backend.list("")) == ["l/blob", "views/v1/file"]
    with pytest.raises(NotFound):
        backend.link("l/missing", "views/v1/other")


# -- a large round trip -------------------------------------------------------------------


@pytest.mark.slow
def test_large_round_trip_by_digest(backend: Backend) -> None:
    """>= 200 MiB written in parallel, out of order, and read back in other-sized ranges.
    Only a few parts are in memory at a time."""
    ps = part_size_for(backend, 8 * MiB)
    size = 200 * MiB + 12_345
    layout = PartLayout(size, ps)

    def part(i: int) -> bytes:
        return payload(20_000 + i, layout.length(i))

    expected = xxhash.xxh3_128()
    for i in range(layout.count):
        expected.update(part(i))
    order = list(range(layout.count))
    random.Random(11).shuffle(order)
    writer = backend.begin("large/object.bin", size, ps)
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda i: writer.put_part(i, part(i)), order))
    assert writer.commit().size == size

    info = backend.stat("large/object.bin")
    got = xxhash.xxh3_128()
    buf = bytearray(7 * MiB)  # not a multiple of the part size: reads cross parts
    offset = 0
    while offset < size:
        n = read_range_into(backend, "large/object.bin", offset, buf, etag=info.etag)
        assert n > 0
        got.update(memoryview(buf)[:n])
        offset += n
    assert offset == size
    assert got.hexdigest() == expected.hexdigest()
    backend.delete("large/object.bin")


# -- error translation --------------------------------------------------------------------


def test_missing_bucket_is_not_found(make_backend: MakeBackend) -> None:
    """Invariant 7: a missing bucket is a permanent, named error (never an empty listing)."""
    missing = make_backend(missing_bucket=True)
    with pytest.raises(NotFound) as caught:
        list(missing.list(""))
    assert not caught.value.retryable
    with pytest.raises(NotFound):
        missing.stat("key")
    with pytest.raises(NotFound):
        missing.read_range("key", 0, 10)
    with pytest.raises(NotFound):
        writer = missing.begin("key", 3, 3)
        writer.put_part(0, b"abc")
        writer.commit()
    # Writing must not have created the bucket (or an unmounted POSIX root).
    with pytest.raises(NotFound):
        list(missing.list(""))


_CHILD = """
import json, os, sys
from datasync.backends.posix import PosixBackend
backend = PosixBackend(sys.argv[1])
if os.geteuid() == 0:  # drop to nobody after imports (the interpreter may live in /root)
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except Exception as exc:
        out[name] = type(exc).__name__
attempt("list", lambda: list(backend.list("")))
attempt("stat", lambda: backend.stat("secret.txt"))
attempt("read", lambda: backend.read_range("secret.txt", 0, 1))
def write():
    w = backend.begin("new.txt", 1, 1)
    w.put_part(0, b"x")
    w.commit()
attempt("write", write)
print(json.dumps(out))
"""


def test_bad_credentials_are_permission_denied(
    backend_kind: str, make_backend: MakeBackend
) -> None:
    """Invariant 7: refused credentials are a permanent ``PermissionDenied``."""
    if backend_kind == "memory":
        # No credentials in memory: check that a denial is surfaced at once, not retried.
        backend = make_backend()
        put(backend, "k", b"v")
        assert isinstance(backend, MemoryBackend)
        backend.inject(lambda: PermissionDenied("injected denial"), times=1)
        sleeps: list[float] = []
        retrying = RetryingBackend(backend, RetryPolicy(sleep=sleeps.append))
        with pytest.raises(PermissionDenied):
            retrying.stat("k")
        assert sleeps == []
        assert backend.stat("k").size == 1
        return
    if backend_kind in POSIX_KINDS:
        # POSIX credentials are the process's uid. Root bypasses modes, so the denied
        # access runs in a child that drops to nobody (65534): a real EACCES either way.
        outer = tempfile.mkdtemp(prefix="datasync-perm-")
        try:
            root = Path(outer) / "root"
            root.mkdir(mode=0o700)
            (root / "secret.txt").write_bytes(b"s")
            os.chmod(outer, 0o711)
            if os.geteuid() != 0:
                os.chmod(root, 0o000)
            done = subprocess.run(
                [sys.executable, "-c", _CHILD, str(root)],
                capture_output=True,
                text=True,
                check=False,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            result = json.loads(done.stdout)
            assert result == dict.fromkeys(["list", "stat", "read", "write"], "PermissionDenied")
        finally:
            os.chmod(outer, 0o700)
            (Path(outer) / "root").chmod(0o700)
            subprocess.run(["rm", "-rf", outer], check=True)
        return
    denied = make_backend(bad_credentials=True)
    with pytest.raises(PermissionDenied) as caught:
        list(denied.list(""))
    assert not caught.value.retryable
    with pytest.raises(PermissionDenied):
        writer = denied.begin("key", 3, 3)
        writer.put_part(0, b"abc")
        writer.commit()


def test_throttling_and_transient_errors_are_retried() -> None:
    """Invariant 7: throttling and transient errors are retried through ``RetryingBackend``,
    honouring Retry-After; the hooks hear every throttle, retry and success. Memory fault
    hooks stand in for a throttling server here; real 503/429 responses belong in the cloud
    backends' own tests (their translation of throttling replies)."""
    name = f"throttle-{uuid.uuid4().hex}"
    memory = MemoryBackend(name, page_size=2)
    try:
        put(memory, "k", b"abc")
        sleeps: list[float] = []
        throttles: list[Throttled] = []
        retries: list[RetryEvent] = []
        successes: list[None] = []
        policy = RetryPolicy(sleep=sleeps.append, random=lambda: 1.0)
        backend = RetryingBackend(
            memory,
            policy,
            on_throttled=throttles.append,
            on_success=lambda: successes.append(None),
            on_retry=retries.append,
        )
        memory.inject(lambda: Throttled("slow down", retry_after=2.5), times=2, ops={"read_range"})
        memory.inject(lambda: TransientError("connection reset"), times=1, ops={"stat"})
        assert backend.read_range("k", 0, 3) == b"abc"
        assert sleeps == [2.5, 2.5]  # Retry-After is a floor for the backoff
        assert [t.retry_after for t in throttles] == [2.5, 2.5]
        assert backend.stat("k").size == 3
        assert sleeps == [2.5, 2.5, 0.1]
        assert [(e.attempt, type(e.error)) for e in retries] == [
            (1, Throttled),
            (2, Throttled),
            (1, TransientError),
        ]
        assert len(successes) == 2
        # Writers are retried too: a part upload and a commit that fail once.
        memory.inject(lambda: TransientError("reset"), times=1, ops={"put_part"})
        memory.inject(lambda: TransientError("reset"), times=1, ops={"commit"})
        writer = backend.begin("w", 3, 3)
        writer.put_part(0, b"xyz")
        writer.commit()
        assert read_all(memory, "w") == b"xyz"
        assert len(retries) == 5
        # A listing that breaks midway resumes after the last key it yielded.
        for i in range(5):
            put(memory, f"l/{i}", b"x")
        listing = backend.list("l/")
        first = [next(listing).key for _ in range(3)]  # the second page is in hand
        memory.inject(lambda: TransientError("reset"), times=1, ops={"list"})
        retried = len(retries)
        assert first + keys(listing) == [f"l/{i}" for i in range(5)]
        assert len(retries) == retried + 1
        memory.inject(lambda: Throttled("slow down"), times=100, ops={"stat"})
        with pytest.raises(Throttled) as caught:
            backend.stat("k")
        assert "gave up after 8 attempt(s)" in "".join(caught.value.__notes__)
    finally:
        drop_store(name)
