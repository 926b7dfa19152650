"""The claim statement, for PostgreSQL and SQLite, with or without per-link caps.

A claim is ONE statement (``TaskStates.claim`` runs it):

* PostgreSQL: ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT n)
  RETURNING``; the middle SELECT re-checks the candidates and locks the ones nobody else
  holds, in claim order.
* SQLite: the same UPDATE without row locks, inside ``BEGIN IMMEDIATE`` (the database write
  lock), so two claimers never get the same task.

Candidates are the head of each claim index (queued tasks in claim order; leases that may
have expired), so a claim reads O(n) rows however long the queue is. Without link caps each
head is read and locked in one pass (``FOR UPDATE SKIP LOCKED LIMIT n``, as a bare
SKIP LOCKED queue does); with caps a window of candidates is ranked per link first.

**Link caps** (``[sites.SRC.links.DST] concurrency``, as FTS3's per-link "max active"):
the claim never leases more tasks on a link than its cap, counting live leases of every
worker on every host. Without them, claiming by least slack sends every free worker to the
most urgent link while the others idle (the tasks of one placement share a link), and a
worker holding a task whose link is full would wait with nothing to do. With caps, free
workers go down the queue to the next link with room. One statement leases at most a
link's room (its candidates ranked per link); full links are left out of the candidate scan
itself, so ``TaskStates.claim`` repeats the statement in the same transaction while it
fills links, and a long queue on a full link cannot hide the others' tasks. That scan walks
past the full links' queued rows (cost: their queue length, only when caps are
configured). On PostgreSQL two concurrent claimers read the same live count, so a link
can exceed its cap by one claim batch for the length of a lease; the host-wide slot files
(``datasync.transfer.limits``) still bound each host.

**Pauses**: tasks that read from or write to a site an operator paused
(``site_pauses``: ``datasync pause``) are left out of the candidate scan until the pause
ends or is lifted.

**Reach**: a worker that can reach only some sites (``datasync worker --sites``: the
on-prem POSIX site is mounted only on-prem) claims only tasks whose source and destination
are among them.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import sqlalchemy as sa

__all__ = ["CLAIM_COLUMNS", "claim_statement", "returning_columns"]

_TS = sa.DateTime(timezone=True)
_ORDER = "latest_start, priority DESC, created_at, id"
_RETURNING = (
    "id, placement_id, parent_id, kind, payload, attempts, max_attempts, lease_expires_at,"
    " priority, deadline, created_at, latest_start"
)
# Claimable rows, as one SQL predicate (``{now}`` is ``now()`` or ``:now``).
_CLAIMABLE = """((state = 'queued' AND blocked_by = 0 AND not_before <= {now})
       OR (state = 'leased' AND lease_expires_at < {now} AND attempts < max_attempts))"""
_TAKEOVER_NOTE = "'lease of ' || {t}lease_owner || ' expired'"

# The caps as rows (src, dst, n) from the JSON parameter :caps, per dialect.
_CAPS = {
    "pg": "SELECT src, dst, n FROM json_to_recordset(CAST(:caps AS json))"
    " AS c(src text, dst text, n integer)",
    "sqlite": "SELECT json_extract(value, '$.src') AS src, json_extract(value, '$.dst') AS dst,"
    " json_extract(value, '$.n') AS n FROM json_each(:caps)",
}
# Live leases per link, and the links that are full.
_LINK_CTES = """caps AS ({caps}),
busy AS (SELECT src_site, dst_site, count(*) AS n FROM tasks
          WHERE state = 'leased' AND lease_expires_at >= {now} AND src_site IS NOT NULL
          GROUP BY src_site, dst_site),
full_links AS (SELECT caps.src, caps.dst FROM caps
                 JOIN busy ON busy.src_site = caps.src AND busy.dst_site = caps.dst
                WHERE busy.n >= caps.n)"""
_NOT_FULL = """AND NOT EXISTS (SELECT 1 FROM full_links f
                            WHERE f.src = tasks.src_site AND f.dst = tasks.dst_site)"""
# The sites a worker can reach (parameter :sites, a JSON list of names), per dialect.
_SITES = {
    "pg": "SELECT json_array_elements_text(CAST(:sites AS json))",
    "sqlite": "SELECT value FROM json_each(:sites)",
}
_IN_REACH = """AND dst_site IN ({sites})
                       AND (src_site IS NULL OR src_site IN ({sites}))"""


# Tasks of a site an operator paused (``site_pauses``, usually empty) are never claimed.
_NOT_PAUSED = """AND NOT EXISTS (SELECT 1 FROM site_pauses p
                                  WHERE p.until > {now}
                                    AND (p.site = tasks.dst_site OR p.site = tasks.src_site))"""


def _candidates(now: str, not_full: str) -> str:
    not_paused = _NOT_PAUSED.format(now=now)
    return f"""
    SELECT id FROM (SELECT id FROM tasks
                     WHERE state = 'queued' AND blocked_by = 0 AND not_before <= {now}
                       {not_paused} {not_full}
                     ORDER BY {_ORDER}
                     LIMIT :window) AS queued
    UNION ALL
    SELECT id FROM (SELECT id FROM tasks
                     WHERE state = 'leased' AND lease_expires_at < {now}
                       AND attempts < max_attempts {not_paused} {not_full}
                     ORDER BY lease_expires_at
                     LIMIT :window) AS expired"""


def _heads(now: str, reach: str, lock: str) -> str:
    """Without caps: the first ``n`` claimable rows of each claim index, locked as they are
    read (rows others hold are skipped; a row taken meanwhile fails its re-checked WHERE),
    then the first ``n`` of those in claim order. The rows left over stay locked until the
    claim commits; nobody waits for them."""
    not_paused = _NOT_PAUSED.format(now=now)
    columns = "id, latest_start, priority, created_at"
    return f"""SELECT id FROM (
    SELECT {columns} FROM (SELECT {columns} FROM tasks
                     WHERE state = 'queued' AND blocked_by = 0 AND not_before <= {now}
                       {not_paused} {reach}
                     ORDER BY {_ORDER}{lock}
                     LIMIT :n) AS queued
    UNION ALL
    SELECT {columns} FROM (SELECT {columns} FROM tasks
                     WHERE state = 'leased' AND lease_expires_at < {now}
                       AND attempts < max_attempts {not_paused} {reach}
                     ORDER BY lease_expires_at{lock}
                     LIMIT :n) AS expired) AS heads
         ORDER BY {_ORDER}
         LIMIT :n"""


def _chosen(now: str, capped: bool, reach: str, lock: str) -> str:
    """The ids to lease, in claim order: claimable candidates, at most a link's room each."""
    claimable = _CLAIMABLE.format(now=now)
    if not capped:
        return _heads(now, reach, lock)
    # Rank each link's candidates in claim order; a link with cap c and b live leases
    # takes its first c - b.
    ranked = f"""SELECT c.id FROM (
            SELECT id, src_site, dst_site, latest_start, priority, created_at,
                   ROW_NUMBER() OVER (PARTITION BY src_site, dst_site ORDER BY {_ORDER}) AS rn
              FROM tasks
             WHERE id IN ({_candidates(now, f"{_NOT_FULL} {reach}")})
               AND {claimable}) AS c
          LEFT JOIN caps ON caps.src = c.src_site AND caps.dst = c.dst_site
          LEFT JOIN busy ON busy.src_site = c.src_site AND busy.dst_site = c.dst_site
         WHERE caps.n IS NULL OR COALESCE(busy.n, 0) + c.rn <= caps.n"""
    if not lock:
        return f"""SELECT id FROM ({ranked}) AS r
          JOIN tasks USING (id)
         ORDER BY {_ORDER}
         LIMIT :n"""
    # PostgreSQL allows no FOR UPDATE next to a window function: lock in an outer SELECT.
    return f"""SELECT id FROM tasks
         WHERE id IN ({ranked})
           AND {claimable}
         ORDER BY {_ORDER}{lock}
         LIMIT :n"""


@cache
def claim_statement(pg: bool, capped: bool, scoped: bool = False) -> sa.TextualSelect:
    """The claim for a dialect; ``capped`` adds the per-link caps (parameter ``:caps``,
    a JSON list of ``{"src", "dst", "n"}``); ``scoped`` only takes tasks whose sites are
    all in ``:sites`` (a JSON list: the sites the worker can reach)."""
    now = "now()" if pg else ":now"
    reach = _IN_REACH.format(sites=_SITES["pg" if pg else "sqlite"]) if scoped else ""
    ctes = f"WITH {_LINK_CTES.format(caps=_CAPS['pg' if pg else 'sqlite'], now=now)}\n"
    if pg:
        sql = f"""{ctes if capped else ""}UPDATE tasks AS t
   SET state = 'leased',
       lease_owner = :owner,
       lease_expires_at = now() + make_interval(secs => :lease_seconds),
       started_at = now(),
       attempts = t.attempts + 1,
       errors = CASE WHEN t.state = 'leased'
                THEN (t.errors::jsonb || jsonb_build_array(jsonb_build_object(
                        'at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"'),
                        'class', 'LeaseExpired',
                        'message', {_TAKEOVER_NOTE.format(t="t.")})))::json
                ELSE t.errors END
 WHERE t.id IN ({_chosen(now, capped, reach, lock=" FOR UPDATE SKIP LOCKED")})
RETURNING {_RETURNING}
"""
        return sa.text(sql).columns(*returning_columns(_RETURNING, CLAIM_COLUMNS))
    sql = f"""{ctes if capped else ""}UPDATE tasks
   SET state = 'leased',
       lease_owner = :owner,
       lease_expires_at = :until,
       started_at = :now,
       attempts = attempts + 1,
       errors = CASE WHEN state = 'leased'
                THEN json_insert(errors, '$[#]', json_object(
                        'at', strftime('%Y-%m-%dT%H:%M:%S+00:00', 'now'),
                        'class', 'LeaseExpired',
                        'message', {_TAKEOVER_NOTE.format(t="")}))
                ELSE errors END
 WHERE id IN ({_chosen(now, capped, reach, lock="")})
RETURNING {_RETURNING}
"""
    return (
        sa.text(sql)
        .bindparams(sa.bindparam("now", type_=_TS), sa.bindparam("until", type_=_TS))
        .columns(*returning_columns(_RETURNING, CLAIM_COLUMNS))
    )


CLAIM_COLUMNS: dict[str, sa.types.TypeEngine[Any]] = {
    "payload": sa.JSON(),
    "lease_expires_at": _TS,
    "deadline": _TS,
    "created_at": _TS,
    "latest_start": _TS,
}


def returning_columns(
    names: str, types: dict[str, sa.types.TypeEngine[Any]]
) -> list[sa.ColumnClause[Any]]:
    """A text statement's RETURNING list as columns, in order: SQLAlchemy then matches the
    result by position and caches its metadata with the statement (by name, it rebuilds
    it from the cursor description at every execution)."""
    return [sa.column(n.strip(), types.get(n.strip())) for n in names.split(",")]
