"""Benchmark: download a 1 GiB object from each emulator with parallel ranged reads through
our backends, and with ``rclone copy`` against the same emulator in the same run.

Not part of ``make test`` (``make bench`` runs it). Results, with the commands, go to
``docs/bench-results/cloud-download.md``. The emulators keep objects in memory (moto, the
GCS emulator) or on local disk (Azurite), so these numbers measure the client and the
emulator together on this 2-core box, not the cloud. Both downloads are verified by digest
(outside the timed part). ``DATASYNC_BENCH_CLOUD_MIB`` shrinks the object for a dry run.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
import xxhash

from datasync.backends.azure import AzureBackend
from datasync.backends.base import Backend, read_range_into
from datasync.backends.gcs import GCSBackend
from datasync.backends.s3 import S3Backend
from tests.fixtures.emulators import (
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    S3_KEYS,
    make_azure_backend,
    make_gcs_backend,
    make_s3_backend,
)

MiB = 1024 * 1024
SIZE = int(os.environ.get("DATASYNC_BENCH_CLOUD_MIB", "1024")) * MiB
PART = 64 * MiB
WORKERS = 8
# Same request pattern as rclone's multi-thread download (size / streams per request): the
# emulators pay a per-request cost that grows with the object, so many small ranges would
# measure the emulator, not the client.
RANGE = max(32 * MiB, -(-SIZE // WORKERS))
RESULTS = Path(__file__).resolve().parents[2] / "docs" / "bench-results" / "cloud-download.md"
# kind -> (ours MB/s, rclone MB/s, ours CPU s/GiB, rclone CPU s/GiB, rclone command)
_rows: dict[str, tuple[float, float, float, float, str]] = {}


def _upload(backend: Backend, key: str) -> str:
    block = os.urandom(PART)
    count = -(-SIZE // PART)
    writer = backend.begin(key, SIZE, PART)
    digest = xxhash.xxh3_128()

    def put(i: int) -> None:
        n = min(PART, SIZE - i * PART)
        writer.put_part(i, memoryview(block)[:n])

    for i in range(count):
        digest.update(memoryview(block)[: min(PART, SIZE - i * PART)])
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(put, range(count)))
    writer.commit()
    return digest.hexdigest()


def _download(backend: Backend, key: str, dest: Path) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (the emulators run in others)."""
    info = backend.stat(key)
    fd = os.open(dest, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, info.size)

        local = threading.local()

        def one(offset: int) -> None:
            # As the executor reads: into a reusable buffer of its own, then written out.
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = bytearray(RANGE)
            view = memoryview(buf)[: min(RANGE, info.size - offset)]
            n = read_range_into(backend, key, offset, view, etag=info.etag)
            os.pwrite(fd, view[:n], offset)

        start, cpu = time.perf_counter(), time.process_time()
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(one, range(0, info.size, RANGE)))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        os.close(fd)
    return elapsed, cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for children: rclone
    return usage.ru_utime + usage.ru_stime


def _digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with path.open("rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _rclone_env(kind: str, backend: Backend, request: pytest.FixtureRequest) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}  # ENVIRONMENT.md
    if kind == "s3":
        env.update(
            RCLONE_CONFIG_EMU_TYPE="s3",
            RCLONE_CONFIG_EMU_PROVIDER="Other",
            RCLONE_CONFIG_EMU_ENDPOINT=str(request.getfixturevalue("moto_server")),
            RCLONE_CONFIG_EMU_REGION="us-east-1",
            RCLONE_CONFIG_EMU_ACCESS_KEY_ID=S3_KEYS["aws_access_key_id"],
            RCLONE_CONFIG_EMU_SECRET_ACCESS_KEY=S3_KEYS["aws_secret_access_key"],
        )
    elif kind == "azure":
        from datetime import timedelta

        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        assert isinstance(backend, AzureBackend)
        container = backend.container
        sas = generate_container_sas(
            AZURITE_ACCOUNT,
            container,
            account_key=AZURITE_KEY,
            permission=ContainerSasPermissions(read=True, list=True),
            expiry=datetime.now(UTC) + timedelta(hours=2),
        )
        endpoint = request.getfixturevalue("azurite").endpoint
        env.update(
            RCLONE_CONFIG_EMU_TYPE="azureblob",
            RCLONE_CONFIG_EMU_SAS_URL=f"{endpoint}/{container}?{sas}",
        )
    else:
        env.update(
            RCLONE_CONFIG_EMU_TYPE="google cloud storage",
            RCLONE_CONFIG_EMU_ANONYMOUS="true",
            RCLONE_CONFIG_EMU_ENDPOINT=str(request.getfixturevalue("gcs_emulator"))
            + "/storage/v1/",
        )
    return env


@pytest.mark.parametrize("kind", ["s3", "azure", "gcs"])
def test_bench_cloud_download(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    rclone = shutil.which("rclone")
    if rclone is None:
        pytest.skip("rclone not installed: apt-get install rclone (make bench does)")
    factories: dict[str, Callable[[pytest.FixtureRequest], Backend]] = {
        "s3": make_s3_backend,
        "azure": make_azure_backend,
        "gcs": make_gcs_backend,
    }
    backend = factories[kind](request)
    expected = _upload(backend, "bench.bin")

    ours = tmp_path / "ours.bin"
    ours_s, ours_cpu = _download(backend, "bench.bin", ours)
    assert _digest(ours) == expected
    ours.unlink()

    out = tmp_path / "rclone"
    opts = ["--retries", "1", "--low-level-retries", "1"]
    if kind == "gcs":
        # rclone's GCS backend cannot parse gcp-storage-emulator's JSON (numbers where the
        # API has strings: "json: invalid use of ,string struct tag"), so rclone reads the
        # same object from the same emulator through its media URL, in a single stream.
        endpoint = request.getfixturevalue("gcs_emulator")
        assert isinstance(backend, GCSBackend)
        media = f"{endpoint}/download/storage/v1/b/{backend.bucket_name}/o/bench.bin?alt=media"
        cmd = [rclone, "copyurl", media, str(out / "bench.bin"), *opts]
    else:
        # The container is the remote's root for an Azure SAS URL; S3 paths start at the bucket.
        assert isinstance(backend, AzureBackend | S3Backend)
        root = backend.container if isinstance(backend, AzureBackend) else backend.bucket
        streams = ["--multi-thread-streams", str(WORKERS), "--multi-thread-cutoff", "64M"]
        cmd = [rclone, "copy", f"emu:{root}/bench.bin", str(out), *streams, *opts]
    start, cpu = time.perf_counter(), _children_cpu()
    subprocess.run(cmd, env=_rclone_env(kind, backend, request), check=True, timeout=1800)
    rclone_s, rclone_cpu = time.perf_counter() - start, _children_cpu() - cpu
    assert _digest(out / "bench.bin") == expected
    shutil.rmtree(out)
    backend.delete("bench.bin")

    gib = SIZE / 1024**3
    _rows[kind] = (
        SIZE / ours_s / 1e6,
        SIZE / rclone_s / 1e6,
        ours_cpu / gib,
        rclone_cpu / gib,
        " ".join(cmd[1:]),
    )
    _write_results()


def _write_results() -> None:
    lines = [
        "# Cloud download: datasync ranged reads vs rclone, against the emulators",
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on this machine ({os.cpu_count()} cores), "
        f"object {SIZE // MiB} MiB, ours: {WORKERS} threads x {RANGE // MiB} MiB ranged reads "
        "pinned to the ETag (`read_range_into` a reused buffer per thread, as the executor "
        "reads), pwrite into a preallocated file; rclone with the same stream count.",
        "",
        "Command: `make bench`, or",
        "`.venv/bin/pytest -q -s tests/bench/test_bench_cloud_download.py`",
        "",
        "| emulator | datasync MB/s | rclone MB/s | datasync / rclone "
        "| client CPU s/GiB, datasync | client CPU s/GiB, rclone | rclone command |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for kind, (ours, theirs, ours_cpu, rclone_cpu, cmd) in sorted(_rows.items()):
        lines.append(
            f"| {kind} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f} "
            f"| {ours_cpu:.2f} | {rclone_cpu:.2f} | `rclone {cmd}` |"
        )
    lines += [
        "",
        "Client CPU is what the downloading process itself spent (ours: this process;",
        "rclone: the waited-for child), which other load on the machine does not change,",
        "unlike MB/s. The client and the emulator share 2 cores. moto (one Python process,",
        "objects in memory, per-request cost growing with the object) bounds both tools on",
        "S3. Where",
        "rclone is ahead, our cost is the copies Python makes of response bodies under the",
        "GIL. Azure and GCS bodies are read with `http.client`'s `readinto` straight into",
        "the caller's buffer (`backends/httpbody.py`): before that the Azure SDK read 1 MiB",
        "blocks, joined them and we copied again (0.44x rclone at 1 GiB), and GCS read the",
        "whole range into a new `bytes` (0.36x).",
        "GCS: rclone's GCS backend cannot parse gcp-storage-emulator's JSON (`json: invalid",
        "use of ,string struct tag`), so rclone fetches the same object from the same emulator",
        "with `copyurl` on its media URL, which is a single stream.",
        "",
    ]
    RESULTS.write_text("\n".join(lines), encoding="utf-8")
