"""Registration from object stores gives the same entries and version id as a local scan.

Runs ``scan_backend`` against moto (S3), Azurite and the GCS emulator, on one tree with a
multi-chunk file, an empty file, odd characters and a non-NFC name, compared with
``scan_directory`` over the same bytes on disk.
"""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

from datasync.backends.base import Backend, ObjectInfo, PartLayout
from datasync.backends.cloudscan import ordered_objects, scan_backend
from datasync.errors import InvalidPath, SourceChanged
from datasync.manifest.canonical import version_id
from datasync.manifest.scan import scan_directory
from datasync.models import ManifestHeader
from tests.fixtures.emulators import make_azure_backend, make_gcs_backend, make_s3_backend
from tests.fixtures.passthrough import PassThrough

pytestmark = pytest.mark.emulator

MiB = 1024 * 1024
CHUNK = MiB  # the smallest chunk size a manifest allows: multi-chunk files stay small
FACTORIES: dict[str, Callable[[pytest.FixtureRequest], Backend]] = {
    "s3": make_s3_backend,
    "azure": make_azure_backend,
    "gcs": make_gcs_backend,
}

TREE = {
    "big/chunked.bin": 3 * MiB + 12_345,  # four chunks, read in several ranges
    "empty": 0,
    "a b/c+d%20.txt": 5_000,
    "emoji/🚀.json": 77,
    "z/last": 1,
    # Stored decomposed (NFD) on both sides; the manifest path is its NFC form.
    unicodedata.normalize("NFD", "café/menu.txt"): 300,
}


def _upload(backend: Backend, key: str, data: bytes) -> None:
    part = max(len(data), backend.capabilities.min_part_size, 1)
    layout = PartLayout(len(data), part)
    writer = backend.begin(key, len(data), part)
    for i in range(layout.count):
        writer.put_part(i, data[layout.offset(i) : layout.offset(i) + layout.length(i)])
    writer.commit()


@pytest.fixture(params=sorted(FACTORIES))
def cloud(request: pytest.FixtureRequest) -> Backend:
    return FACTORIES[request.param](request)


def test_cloud_registration_matches_local_scan(cloud: Backend, tmp_path: Path) -> None:
    rng = random.Random(3)
    local = tmp_path / "tree"
    for name, size in TREE.items():
        data = rng.randbytes(size)
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
        _upload(cloud, f"ds/{name}", data)
    _upload(cloud, "elsewhere", b"outside the prefix")

    progress: list[tuple[int, int]] = []
    remote = list(
        scan_backend(
            cloud,
            "ds",
            chunk_size=CHUNK,
            workers=4,
            read_size=700_000,  # ranges that do not line up with chunks
            on_progress=lambda f, b: progress.append((f, b)),
        )
    )
    expected = list(scan_directory(local, chunk_size=CHUNK, workers=2))
    assert remote == expected
    assert len(remote[[e.path for e in remote].index("big/chunked.bin")].chunks) == 4
    assert "café/menu.txt" in [e.path for e in remote]
    header = ManifestHeader(chunk_size=CHUNK)
    assert version_id(header, remote) == version_id(header, expected)
    assert progress[-1] == (len(TREE), sum(TREE.values()))


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_object_changed_during_scan_is_source_changed(
    request: pytest.FixtureRequest, kind: str
) -> None:
    """Not on GCS: gcp-storage-emulator ignores generation preconditions (ENVIRONMENT.md),
    and that backend declares ``conditional_read=False`` there (test_gcs_specific)."""
    cloud = FACTORIES[kind](request)
    _upload(cloud, "f/one", b"1" * 1000)
    listed = list(cloud.list("f/"))
    _upload(cloud, "f/one", b"2" * 1000)  # replaced after the listing

    class StaleListing(PassThrough):
        def list(self, prefix: str = "") -> object:
            return iter(listed)

    with pytest.raises(SourceChanged):
        list(scan_backend(cast(Backend, StaleListing(cloud)), "f", chunk_size=CHUNK))


def _infos(*keys: str) -> list[ObjectInfo]:
    return [ObjectInfo(key=k, size=0) for k in keys]


def test_ordering_window_reorders_and_refuses_what_it_cannot() -> None:
    nfd = unicodedata.normalize("NFD", "é")  # "e" + U+0301 sorts before "f"; NFC "é" after
    got = [p for p, _ in ordered_objects(iter(_infos(f"{nfd}", "f", "g")), window=10)]
    assert got == ["f", "g", "é"]
    with pytest.raises(InvalidPath, match="out of order"):
        list(ordered_objects(iter(_infos(nfd, "f", "g")), window=0))
    with pytest.raises(InvalidPath, match="listed twice"):
        list(ordered_objects(iter(_infos(nfd, "é")), window=10))
    with pytest.raises(InvalidPath):
        list(ordered_objects(iter(_infos("a/../b")), window=10))


def test_skip_leaves_out_a_subtree_below_the_prefix_and_backslashes_are_refused() -> None:
    keys = _infos("p/.datasync/blobs/x", "p/.datasync-x", "p/.datasyncx/y", "p/a")
    got = [p for p, _ in ordered_objects(iter(keys), "p/", skip=(".datasync/",))]
    assert got == [".datasync-x", ".datasyncx/y", "a"]
    with pytest.raises(InvalidPath, match="backslash"):
        list(ordered_objects(iter(_infos("a\\b")), window=10))
