"""A small, deterministic sample driving dataset for ``make demo`` and the tests.

``generate(root)`` (re)creates the tree from scratch, byte-for-byte identical on every run,
so registering it again yields the same version id. ``mutate(root)`` applies a fixed
set of changes (one frame rewritten, one sweep grown, one file added, one removed).

The tree has what the manifest must cope with: nested directories, camera ``.jpg``
frames, lidar ``.bin`` sweeps, two shards larger than one chunk at the demo's
``DEMO_CHUNK_SIZE`` (1 MiB), a zero-byte file, and names with spaces and non-ASCII
characters. Usage: ``python -m datasync.demo generate|mutate DIR``.

``python -m datasync.demo moved DATASET@OLD DATASET@NEW SITE`` reports what replicating NEW
to SITE moved: the bytes the placement's tasks wrote, against the bytes of the distinct
blobs NEW has and OLD lacks (the diff's added and changed files). It reads the settings
like the CLI does (``DATASYNC_HOME``, ``DATASYNC_CONFIG``), so ``make demo`` can show that
an incremental version moves only its changed bytes.
"""

from __future__ import annotations

import argparse
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEMO_CHUNK_SIZE", "MUTATED", "MovedReport", "generate", "main", "moved", "mutate"]

DEMO_CHUNK_SIZE = 1024 * 1024
CAMERAS = ("front", "front_left", "rear")
FRAMES = 12
SWEEPS = 8
SHARD_SIZE = 3 * 1024 * 1024 + 512 * 1024  # 3.5 chunks: full chunks plus a partial one
# Paths ``mutate`` touches: (changed, changed, added, removed).
MUTATED = (
    "camera/front/000003.jpg",
    "lidar/top/000005.bin",
    "camera/front/000012.jpg",
    "notes/Fahrtnotizen Shibuya 渋谷.txt",
)
_JPEG_HEADER = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _frame(rng: random.Random) -> bytes:
    return _JPEG_HEADER + rng.randbytes(rng.randrange(20_000, 60_000)) + b"\xff\xd9"


def generate(root: Path, *, seed: int = 2026) -> int:
    """Recreate the sample dataset under ``root``; return the number of files."""
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    rng = random.Random(seed)
    count = 0
    for camera in CAMERAS:
        for i in range(FRAMES):
            _write(root / "camera" / camera / f"{i:06d}.jpg", _frame(rng))
            count += 1
    for i in range(SWEEPS):
        _write(
            root / "lidar" / "top" / f"{i:06d}.bin", rng.randbytes(rng.randrange(100_000, 200_000))
        )
        count += 1
    for i in range(2):
        _write(root / "shards" / f"train-{i:05d}.tar", rng.randbytes(SHARD_SIZE))
        count += 1
    _write(root / "calib" / "EMPTY_MARKER", b"")
    _write(root / "calib" / "intrinsics front.yaml", b"fx: 1266.4\nfy: 1266.4\ncx: 816.3\n")
    _write(root / MUTATED[3], "Kreuzung 渋谷, Regen, 23:10 JST\n".encode())
    _write(root / "notes" / "Ölspur \u2013 Route 246.txt", "Ölspur auf Spur 2\n".encode())
    return count + 4


def mutate(root: Path) -> list[str]:
    """Change a few files of a generated tree; return the touched paths."""
    root = Path(root)
    rng = random.Random(7)
    changed, grown, added, removed = MUTATED
    _write(root / changed, _frame(rng))
    with (root / grown).open("ab") as f:
        f.write(rng.randbytes(4096))
    _write(root / added, _frame(rng))
    (root / removed).unlink()
    return list(MUTATED)


@dataclass(frozen=True)
class MovedReport:
    """What one placement moved, against what its version newly brought."""

    placement_id: int
    state: str
    files_total: int
    tasks: int
    bytes_moved: int  # written by the placement's tasks
    new_blobs: int  # distinct blobs of NEW that OLD lacks
    new_bytes: int  # their bytes: the least an incremental transfer must move


def moved(old_ref: str, new_ref: str, site: str) -> MovedReport:
    """Bytes moved by the placement of ``new_ref`` at ``site`` and the diff's new bytes."""
    # Deferred imports: ``generate``/``mutate`` must not pay for the database stack.
    from datasync.bootstrap import bootstrap
    from datasync.errors import UserError

    with bootstrap() as app:
        diff = app.service.diff(old_ref, new_ref)
        new_digests = {
            c.new_digest: c.new_size or 0 for c in (*diff.added, *diff.changed) if c.new_digest
        }
        # A "new" file whose bytes OLD already had elsewhere (a rename) needs no transfer.
        old_digests = {c.old_digest for c in (*diff.removed, *diff.changed)}
        fresh = {d: n for d, n in new_digests.items() if d not in old_digests}
        rows = [
            p
            for p in app.replication.status(dataset=diff.new.dataset, site=site)
            if p.version_id == diff.new.version_id
        ]
        if not rows:
            raise UserError(f"{new_ref} has no placement at site {site!r}")
        placement = rows[0]
    return MovedReport(
        placement_id=placement.id,
        state=placement.state,
        files_total=placement.files_total,
        tasks=sum(placement.tasks.values()),
        bytes_moved=placement.bytes_moved,
        new_blobs=len(fresh),
        new_bytes=sum(fresh.values()),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m datasync.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=["generate", "mutate", "moved"])
    parser.add_argument("args", nargs="+", help="DIR, or (moved) DATASET@OLD DATASET@NEW SITE")
    args = parser.parse_args(argv)
    if args.action == "moved":
        if len(args.args) != 3:
            parser.error("moved needs DATASET@OLD DATASET@NEW SITE")
        old_ref, new_ref, site = args.args
        from datasync.errors import DatasyncError

        try:
            r = moved(old_ref, new_ref, site)
        except DatasyncError as exc:
            raise SystemExit(f"datasync.demo: error: {exc.message}") from None
        verdict = "only the changed bytes moved" if r.bytes_moved <= r.new_bytes else "MORE moved"
        print(
            f"placement #{r.placement_id} {new_ref} -> {site}: {r.state}, {r.files_total:,} files\n"
            f"  bytes moved by its {r.tasks} tasks: {r.bytes_moved:,}\n"
            f"  new bytes in {new_ref} vs {old_ref}: {r.new_bytes:,} ({r.new_blobs} new blobs)\n"
            f"  {verdict}; every other file was already at {site} and is hard-linked or copied"
            " from its blob store"
        )
        return
    if len(args.args) != 1:
        parser.error(f"{args.action} needs one DIR")
    root = Path(args.args[0])
    if args.action == "generate":
        print(f"generated {generate(root)} files under {root}")
    else:
        print("changed: " + ", ".join(mutate(root)))


if __name__ == "__main__":
    main()
