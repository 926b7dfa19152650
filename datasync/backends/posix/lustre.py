"""Lustre layouts for new files: is a directory on Lustre, and which ``lfs setstripe``.

The POSIX backend asks ``stripe_policy`` once per site. When it returns a policy, every
new temp file is created by ``StripePolicy.create`` (``lfs setstripe <layout> <path>``)
before any byte is written, because a Lustre layout can only be chosen at creation:

* below ``large_threshold_bytes``: ``-c small_count`` (one stripe by default: a small file
  on one OST costs one RPC);
* at or above it: ``large_layout``, by default a progressive file layout (first GiB on one
  OST, up to 16 GiB on four, the rest on all).

A failed ``setstripe`` is logged and the file gets the directory's default layout: a
layout is a performance choice, never a reason to fail a transfer.

Detection: the mount holding the root has type ``lustre`` in ``/proc/self/mountinfo``
(the same fact as statfs magic 0x0BD00BD0); without mountinfo, ``lfs getstripe -d``
succeeding decides. There is no Lustre on our test machines: the tests drive a recording
stand-in ``lfs`` (``tests/unit/test_posix_lustre.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from datasync.errors import ConfigError

__all__ = ["DEFAULT_LARGE_LAYOUT", "StripePolicy", "detect_lustre", "fs_type", "stripe_policy"]

log = logging.getLogger(__name__)

DEFAULT_LARGE_LAYOUT = "-E 1G -c 1 -E 16G -c 4 -E -1 -c -1"


def fs_type(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """File-system type of the mount holding ``path``, or None if mountinfo is unreadable."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best, best_type = "", None
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right:
            continue
        # mountinfo escapes space, tab, newline and backslash as octal.
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, right.split()[0]
    return best_type


def detect_lustre(root: str, lfs: str | None, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """True when ``lfs`` exists and ``root`` sits on a Lustre mount."""
    if lfs is None:
        return False
    found = fs_type(root, mountinfo)
    if found is not None:
        return found == "lustre"
    try:  # no mountinfo (containers, other kernels): ask lfs itself
        done = subprocess.run(
            [lfs, "getstripe", "-d", root], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@dataclass(frozen=True, slots=True)
class StripePolicy:
    """How to lay out new files on one site."""

    lfs: str
    small_count: int = 1
    large_threshold_bytes: int = 1024**3
    large_layout: tuple[str, ...] = tuple(DEFAULT_LARGE_LAYOUT.split())

    def layout_args(self, size: int) -> list[str]:
        """``lfs setstripe`` arguments for a new file of ``size`` bytes."""
        if size >= self.large_threshold_bytes:
            return list(self.large_layout)
        return ["-c", str(self.small_count)]

    def create(self, path: str, size: int) -> bool:
        """Create the empty file ``path`` with its layout. False (and a log line) when lfs
        refuses; then nothing is left at ``path``."""
        argv = [self.lfs, "setstripe", *self.layout_args(size), path]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("lfs setstripe failed for %s: %s; using the default layout", path, exc)
            return False
        if done.returncode != 0:
            log.warning(
                "lfs setstripe failed for %s (exit %d: %s); using the default layout",
                path,
                done.returncode,
                done.stderr.strip(),
            )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return False
        return True


def _as_bool(value: bool | str, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigError(f"posix option {name} must be true, false or auto, got {value!r}")


def stripe_policy(
    root: str,
    *,
    lustre: bool | str = "auto",
    stripe_small_count: int = 1,
    large_threshold_bytes: int = 1024**3,
    large_layout: str | Sequence[str] = DEFAULT_LARGE_LAYOUT,
    lfs_command: str | None = None,
    mountinfo: str = "/proc/self/mountinfo",
) -> StripePolicy | None:
    """The policy for a site rooted at ``root``, or None when striping does not apply.

    ``lustre`` is ``"auto"`` (detect), or true/false to force; forcing it on without an
    ``lfs`` command is a ``ConfigError``.
    """
    # Parse every option first, so a typo fails on every machine, Lustre or not.
    layout = shlex.split(large_layout) if isinstance(large_layout, str) else list(large_layout)
    small_count, threshold = int(stripe_small_count), int(large_threshold_bytes)
    lfs = shutil.which(lfs_command or "lfs")
    if isinstance(lustre, str) and lustre.lower() == "auto":
        enabled = detect_lustre(root, lfs, mountinfo)
    else:
        enabled = _as_bool(lustre, "lustre")
        if enabled and lfs is None:
            raise ConfigError(f"lustre=true for {root} but no `lfs` command on PATH")
    if not enabled or lfs is None:
        return None
    return StripePolicy(lfs, small_count, threshold, tuple(layout))
