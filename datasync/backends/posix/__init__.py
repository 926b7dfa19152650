"""POSIX backend: local disks, NFS and Lustre, rooted at an existing directory.

Modules: ``backend`` (the ``Backend`` protocol), ``tree`` (``SupportsLocalTree``: what
views are built from), ``writer`` (writers and the group commit), ``files`` (the public
helper the backend and the writers share: paths, temp files, publishing), ``io`` (system
calls and the one OS-error translation), ``lustre`` (layouts of new files).

Invariants:

* Nothing appears at a key before ``commit``. A writer fills a hidden temp file in the
  target directory, ``.<name>.datasync-<token>.part`` (deterministic from the token, so a
  resumed writer reopens it), preallocated to the final size; parts are ``pwrite`` at
  ``index * part_size`` from any thread; ``commit`` sets the file's mode to ``file_mode``
  (0444 by default: committed bytes are read-only), fsyncs it, renames it over the key and
  fsyncs the directory. ``abort`` unlinks the temp. ``list`` never shows temps. Each part
  writes through its own ``dup`` of the writer's descriptor, so an ``abort`` racing
  ``put_part`` can never redirect a part into another file that reused the number.
* ``durable_parts()`` is always empty (``capabilities.lists_parts`` is false): a
  preallocated file cannot tell written ranges from zeros, so the engine's chunk map in the
  database is authoritative. Resuming a token whose temp file is gone raises ``NotFound``,
  so stale zeros are never published. ``partial_uploads()`` finds temps left by crashed
  writers, for the auditor.
* The root is never created: a missing root (an unmounted file system) is ``NotFound``,
  not an empty tree. Directories below it are created on demand and left in place on
  delete (removing them would race with concurrent writers).
* Keys cannot leave the root (``check_key``); symlinks already inside the tree are trusted.
* OS errors are translated in one place, ``io.translate_os_errors``.
* A writer holds one descriptor until ``commit``/``abort``/``close``; ``close`` (a chunk
  task that wrote its parts and leaves the commit to another task) releases it and keeps
  the temp file for the next writer of the same token.
* Group commit (``group_commit()``, used for batches of small blobs): every member's bytes
  are durable BEFORE its rename makes it visible at its key, and ``commit_all`` returns
  only after every renamed name and every directory created for the group is durable, so
  the caller records replicas after it returns, never before. Two ways, chosen by
  ``group_sync``: ``fsync`` (each temp fsynced, then every distinct directory once per
  group) or ``syncfs`` (one ``syncfs`` before the renames, one after: 2 flushes per group
  instead of ~3 per file). ``auto`` picks ``syncfs`` on local file systems
  (``SYNCFS_TYPES``), ``fsync`` elsewhere (NFS, Lustre: a client-wide flush there may
  wait for other writers' data). ``syncfs`` reports write-back errors since Linux 5.8.
  ``put_small(items)`` is the same group commit in one call (no writer objects), followed
  by each object's read-back at its key (open, read whole, xxh3-128) for the caller to
  match: one backend call per batch instead of ~10 per blob.
* Large files: a ``put_part`` of at least ``writeback_min_bytes`` goes to the device at
  once. With ``direct_io`` (``auto``: ext4, xfs, Lustre) its aligned head is written
  through an ``O_DIRECT`` twin of the writer's descriptor, straight from the caller's
  buffer (page-aligned pool buffers; an unaligned buffer, offset or tail is written
  buffered), and ``digest`` reads large files back with ``O_DIRECT`` too. Otherwise the
  part is written buffered and its write-back started (``sync_file_range``
  ``SYNC_FILE_RANGE_WRITE``, no wait). Either way the fsync at ``commit`` finds most bytes
  already written instead of starting the whole file's write-back then, and it still
  comes before the rename.

Lustre: when the root is on Lustre (or ``lustre = true``), each new temp file is created
with its layout by ``lfs setstripe`` before any byte is written (see ``lustre.py``).

``datasync.backends.posix`` keeps exporting what the engine imported from the old
single module (``PosixBackend``, ``translate_os_errors``, ...).
"""

from datasync.backends.posix.backend import PosixBackend
from datasync.backends.posix.files import PosixFiles
from datasync.backends.posix.io import (
    is_temp_name,
    os_error_to_storage,
    temp_name,
    translate_os_errors,
)
from datasync.backends.posix.writer import PosixGroupCommit, PosixWriter

__all__ = [
    "PosixBackend",
    "PosixFiles",
    "PosixGroupCommit",
    "PosixWriter",
    "is_temp_name",
    "os_error_to_storage",
    "temp_name",
    "translate_os_errors",
]
