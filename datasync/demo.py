"""A small, deterministic sample driving dataset for ``make demo`` and the tests.

``generate(root)`` (re)creates the tree from scratch, byte-for-byte identical on every run,
so registering it again yields the same version id. ``mutate(root)`` applies a fixed
set of changes (one frame rewritten, one sweep grown, one file added, one removed).

The tree has what the manifest must cope with: nested directories, camera ``.jpg``
frames, lidar ``.bin`` sweeps, two shards larger than one chunk at the demo's
``DEMO_CHUNK_SIZE`` (1 MiB), a zero-byte file, and names with spaces and non-ASCII
characters. Usage: ``python -m datasync.demo generate|mutate DIR``.
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

__all__ = ["DEMO_CHUNK_SIZE", "MUTATED", "generate", "main", "mutate"]

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datasync.demo", description=__doc__)
    parser.add_argument("action", choices=["generate", "mutate"])
    parser.add_argument("root", type=Path)
    args = parser.parse_args(argv)
    if args.action == "generate":
        print(f"generated {generate(args.root)} files under {args.root}")
    else:
        print("changed: " + ", ".join(mutate(args.root)))


if __name__ == "__main__":
    main()
