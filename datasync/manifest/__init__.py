"""Manifests: path rules, canonical bytes and version ids, scanning, and their storage.

The pure core every other part reads, plus the store that keeps versions in the
database. Modules, each with one job:

* ``paths``: what a manifest path may be (NFC, relative, no ``..``/controls/empty
  segments/backslashes).
* ``canonical``: the canonical JSON Lines bytes, their validation, and the sha256 version
  id; ``VersionIdBuilder`` refuses disorder, duplicates and a file that is also a
  directory, for every source.
* ``hashing``: xxh3-128 whole-file and per-chunk digests from files or streams of blocks.
* ``scan``: a local tree to entries in canonical order, hashed in parallel, bounded memory.
* ``statcache``: skip re-hashing files whose stat identity is unchanged (its own SQLite
  file).
* ``producer``: read a producer-supplied manifest (any order) without re-hashing.
* ``remote``: which scanner reads a registration source (directory, ``SITE:path``, URL),
  and the checks every source string passes; object stores are read through
  ``backends.cloudscan``.
* ``refs``, ``diff``: dataset and label names, ``DATASET@REF``; the diff of two ordered
  streams.
* ``store``, ``bulk``: the database side, registering, resolving, labelling, diffing and
  exporting versions (``store``) over bulk inserts and ordered reads (``bulk``).

``store`` and ``bulk`` are the only modules that use the datasync database, and ``remote``
the only one that opens storage backends; the rest touch neither (``scan`` writes to the
stat cache it is given).
"""
