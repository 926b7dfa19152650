"""The replication engine: placements become verified bytes and atomic views at sites.

One direction, one module per arrow (``docs/task-states.md`` draws the states)::

    placements.replicate ─► planner (manifest - site index, bounded pages)
        ─► taskqueue (DB leases: one-statement claims, heartbeats, retries)
        ─► worker processes ─► executor (read, verify, write parts, commit, verify)
        ─► siteindex (replicas, chunk map) ─► materialize (view published atomically)

Shared limits live in ``limits`` and the per-process memory budget in ``buffers``. Import
the submodules directly; this package imports nothing, so it costs nothing to import.
"""
