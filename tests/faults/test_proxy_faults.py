"""Network faults between datasync and the object stores (issue 13, item 3).

Each run replicates one version (12 small files and a 6 MiB shard in 1 MiB chunks) from a
bucket to another bucket of the same emulator, both sites reached through one fault proxy,
so every kind of request passes it: source reads (the chunk digest is checked before a
write), part uploads, commits, the re-read after commit, listings, server-side copies of
the view and their re-reads, the completion marker. The placement must end READY or
FAILED with a classified reason; either way nothing corrupt or partial is published, no
blob is stored under a wrong name, and no task is lost (``tests/faults/harness.py``).

Reproduce one row: ``.venv/bin/pytest -q tests/faults/test_proxy_faults.py -k 's3 and flip'``
(``DATASYNC_FAULT_REPORT=/tmp/faults.jsonl`` appends its figures). ``-k`` matches the
test id, e.g. ``[s3-flip-source]``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from datasync.bootstrap import bootstrap
from datasync.events import TaskRetried, TaskStuck
from tests.faults.conftest import through_proxy
from tests.faults.harness import (
    EventLog,
    Figures,
    assert_blob_store_sound,
    assert_no_task_lost,
    assert_outcome,
    assert_published_right,
    record,
    run_workers,
    timed,
)
from tests.faults.proxy import Fault, FaultProxy
from tests.fixtures.replication import (
    MIB,
    Site,
    cloud_site,
    seed_cloud_source,
    settings_for,
    upload_tree,
    write_tree,
)
from tests.fixtures.transfer import version_pk

pytestmark = pytest.mark.emulator

DATASET = "drive/faults"
# Tuned so each run injects about ten faults (of some 150 requests) and still ends within
# seconds. A flip is aimed at one bucket: in the source's, the chunk digest checked before
# any write catches it; in the destination's, the re-read after commit (or after a view's
# copy) does.
FAULTS = {
    "storm": Fault("storm", every=2, limit=10, retry_after=1.0),
    "reset": Fault("reset", every=3, limit=10),
    "truncate": Fault("truncate", every=2, limit=6),
    "flip-source": Fault("flip", every=2, limit=6, only="<src>"),
    "flip-destination": Fault("flip", every=2, limit=6, only="<dst>"),
    "latency": Fault("latency", every=2, delay=0.1),
}


def small_tree(root: Path) -> dict[str, bytes]:
    """12 small files (one empty, one duplicate) and a 6 MiB shard: two S3 parts."""
    rng = random.Random(13)
    files = {f"cam0/{i:06d}.jpg": rng.randbytes(rng.randint(1000, 6000)) for i in range(8)}
    files["lidar/sweep 000.bin"] = rng.randbytes(20_000)
    files["calib/empty.txt"] = b""
    files["cam1/dup.jpg"] = files["cam0/000001.jpg"]
    files["calib/ünïcødé.json"] = b'{"fx": 1000.0}'
    files["shards/shard-00.bin"] = rng.randbytes(6 * MIB + 5)
    write_tree(root, files)
    return files


def bucket_of(site: Site) -> str:
    """The bucket (S3, GCS) or container (Azure) a cloud site's URL names."""
    rest = site.config.url.split("://", 1)[1]
    return rest.split("/")[1] if site.kind == "azure" else rest.split("/")[0]


@pytest.mark.parametrize("kind", list(FAULTS))
@pytest.mark.parametrize("store", ["s3", "azure", "gcs"])
def test_a_proxy_fault_never_publishes_damage(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    sqlite_url: str,
    fault_proxy: Callable[[str], FaultProxy],
    store: str,
    kind: str,
) -> None:
    proxy = fault_proxy(store)
    src_direct = cloud_site("pipeline", store, request)
    dst_direct = cloud_site("cloud", store, request)
    src, dst = through_proxy(src_direct, proxy), through_proxy(dst_direct, proxy)
    settings = settings_for(tmp_path / "home", sqlite_url, [src, dst])
    files = small_tree(tmp_path / "run")
    figures = Figures(
        fault=kind,
        where=f"{store} -> {store}",
        db="sqlite",
        command=f"pytest tests/faults/test_proxy_faults.py -k '{store}-{kind}'",
    )
    with bootstrap(settings) as app, timed(figures):
        events = EventLog(app)
        v = app.service.register_directory(DATASET, tmp_path / "run", chunk_size=MIB)
        upload_tree(src_direct.backend(), "run/", files)
        pk = version_pk(app.engine, app.store.resolve(f"{DATASET}@{v.version_id}"))
        seed_cloud_source(app, pk, src, "run")
        fault = FAULTS[kind]
        if fault.only is not None:
            target = src_direct if fault.only == "<src>" else dst_direct
            fault = replace(fault, only=f"/{bucket_of(target)}/")
        proxy.set_fault(fault)
        placement = app.replication.replicate(f"{DATASET}@{v.version_id}", "cloud")
        assert run_workers(app, [placement.id], timeout=180), "tasks still pending"
        proxy.set_fault(None)
        state = assert_outcome(app, placement.id, figures)
        figures.extra["tasks"] = assert_no_task_lost(app, placement.id)
        figures.data_lost = assert_published_right(
            dst_direct, DATASET, v.version_id, files, state
        ) + assert_blob_store_sound(app, dst_direct)
        figures.injected = proxy.stats.injected
        figures.retries_seen = proxy.stats.retried
        figures.task_retries = events.count(TaskRetried)
        figures.stuck = events.count(TaskStuck)
        figures.extra["requests"] = proxy.stats.requests
    record(figures)
    assert figures.injected > 0, f"the {kind} fault never fired"
    assert figures.data_lost == 0
