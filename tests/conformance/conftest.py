"""The ``backend`` fixture: one fresh, empty backend per test, for every kind.

* ``memory``: a fresh process-global store, dropped after the test.
* ``posix``: an existing empty directory under ``tmp_path``.
* ``posix-direct``: the same with direct I/O forced on from 4 KiB (``direct_io = true``,
  ``writeback_min_bytes`` = one page): every part and read of a page or more goes through
  ``O_DIRECT`` where the file system allows it, not only those of 8 MiB and more.
* ``retrying``: a posix backend behind ``RetryingBackend`` (which must pass the same suite
  and expose the same optional protocols; sleeps are no-ops).
* ``s3`` / ``azure`` / ``gcs``: a fresh bucket or container on an emulator started once per
  session, from ``tests/fixtures/emulators.py`` (imported lazily, so the memory and posix
  runs need no cloud SDK and no emulator).

``make_backend(missing_bucket=..., bad_credentials=...)`` builds variants for the error
translation tests. Cloud kinds carry the ``emulator`` marker.
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from datasync.backends.base import Backend
from datasync.backends.memory import MemoryBackend, drop_store
from datasync.backends.posix import PosixBackend
from datasync.backends.posix.io import DIRECT_ALIGN
from datasync.backends.retrying import RetryingBackend
from datasync.retry import RetryPolicy

KINDS = [
    "memory",
    "posix",
    "posix-direct",
    "retrying",
    pytest.param("s3", marks=pytest.mark.emulator),
    pytest.param("azure", marks=pytest.mark.emulator),
    pytest.param("gcs", marks=pytest.mark.emulator),
]

MakeBackend = Callable[..., Backend]

# Which kinds declare each optional protocol. Optional tests are parametrized over these
# kinds only (nothing is skipped), and test_optional_protocols_match_the_tables checks
# every kind against them, so a table cannot drift from what a backend declares.
POSIX_KINDS = ("posix", "posix-direct", "retrying")  # a directory on the local file system
GROUP_COMMIT_KINDS = POSIX_KINDS
LOCAL_TREE_KINDS = POSIX_KINDS
PUT_SMALL_KINDS = ("memory", *POSIX_KINDS)
# Commits ``verified`` by the store (``verified_writes``), whose writers hand on part proofs
# (``SupportsPartProofs``); on S3 and GCS a proof names the part's bytes (MD5, CRC32C), on
# Azure the checked send (a block list carries no checksums).
PART_PROOF_KINDS = ("s3", "azure", "gcs")
BYTES_PROOF_KINDS = ("s3", "gcs")


def emulator_kinds(kinds: tuple[str, ...]) -> list[Any]:
    """``kinds`` as parameters of ``backend_kind``, marked as needing their emulator."""
    return [pytest.param(kind, marks=pytest.mark.emulator) for kind in kinds]


@pytest.fixture(params=KINDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_backend(
    request: pytest.FixtureRequest, backend_kind: str, tmp_path: Path
) -> Iterator[MakeBackend]:
    """A factory for backends of this test's kind; everything it made is cleaned up."""
    stores: list[str] = []

    def make(*, missing_bucket: bool = False, bad_credentials: bool = False) -> Backend:
        if backend_kind == "memory":
            name = f"conformance-{uuid.uuid4().hex}"
            if not missing_bucket:
                stores.append(name)
            return MemoryBackend(name, "root", create=not missing_bucket)
        if backend_kind in POSIX_KINDS:
            root = tmp_path / f"root-{uuid.uuid4().hex[:8]}"
            if not missing_bucket:
                root.mkdir()
            if backend_kind == "posix-direct":
                return PosixBackend(root, direct_io=True, writeback_min_bytes=DIRECT_ALIGN)
            posix = PosixBackend(root)
            if backend_kind == "posix":
                return posix
            return RetryingBackend(posix, RetryPolicy(sleep=lambda _s: None))
        emulators = importlib.import_module("tests.fixtures.emulators")
        factory: Callable[..., Backend] = getattr(emulators, f"make_{backend_kind}_backend")
        kwargs: dict[str, Any] = {}
        if missing_bucket:
            kwargs["missing_bucket"] = True
        if bad_credentials:
            kwargs["bad_credentials"] = True
        return factory(request, **kwargs)

    yield make
    for name in stores:
        drop_store(name)


@pytest.fixture
def backend(make_backend: MakeBackend) -> Backend:
    return make_backend()
