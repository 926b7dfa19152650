"""Manifests: path rules, canonical bytes and version ids, hashing, scanning, producer input.

The pure core every other part reads. Modules, each with one job:

* ``paths``: what a manifest path may be (NFC, relative, no ``..``/controls/empty segments).
* ``canonical``: the canonical JSON Lines bytes, their validation, and the sha256 version id.
* ``hashing``: xxh3-128 whole-file and per-chunk digests from files or streams of blocks.
* ``scan``: a local tree to entries in canonical order, hashed in parallel, bounded memory.
* ``statcache``: skip re-hashing files whose stat identity is unchanged.
* ``producer``: read a producer-supplied manifest (any order) without re-hashing.

Nothing here touches the database or the network.
"""
