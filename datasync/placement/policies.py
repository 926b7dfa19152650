"""Declarative placement policies: "every new version of drive/* goes to gaggle and aws".

A policy file is TOML (schema: ``manifests/policy.schema.json``, generated from
``PolicyFile``; example: ``manifests/example-policy.toml``)::

    [[policy]]
    name = "drive-training"
    datasets = ["drive/*"]        # name globs
    labels = ["latest", "prod"]   # optional: only versions carrying one of these labels
    sites = ["gaggle", "aws"]
    keep_last = 2                 # newest matching versions kept (pinned) per dataset
    lifetime_hours = 720          # optional: a pin lasts at most this long
    priority = 5

``apply`` stores the policies in the database (every host sees them) and evaluates them at
once; registering a version (or moving a label) evaluates the policies of its dataset at
once, as Rucio's subscriptions do; ``datasync up`` re-evaluates every policy on a schedule.
Evaluation: for each dataset matching a policy, its newest ``keep_last`` matching versions
are replicated to each site (``origin = policy:<name>``) and pinned there by
``policy:<name>``; older versions lose that pin, so eviction may free them.

A placement a policy made that FAILED is retried by later evaluations with backoff, not at
every one (the cycle Rucio users know: a broken source retried every few minutes for
days): after its n-th failure, not before ``RETRY_FIRST * 2**(n-1)`` (at most
``RETRY_LONGEST``) has passed, and no more after ``RETRY_LIMIT`` failures; ``datasync
replicate`` (a person) still retries it at once. Its history counts the failures.
"""

from __future__ import annotations

import fnmatch
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.engine import Engine
from sqlmodel import col

from datasync.config import Settings
from datasync.db.engine import write_transaction
from datasync.db.ops_tables import PlacementHistory, PolicyRow
from datasync.db.transfer_tables import Placement
from datasync.errors import ConfigError, UserError
from datasync.events import Event, LabelMoved, VersionRegistered
from datasync.manifest.store import ManifestStore
from datasync.models import PlacementState
from datasync.transfer.service import ReplicationService
from datasync.transfer.state import EngineState, as_utc

__all__ = ["RETRY_LIMIT", "Policy", "PolicyEngine", "PolicyFile"]

RETRY_FIRST = timedelta(minutes=10)
RETRY_LONGEST = timedelta(hours=24)
RETRY_LIMIT = 6  # failures after which only a person retries


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    datasets: list[str] = Field(min_length=1, description="Dataset name globs, e.g. drive/*")
    labels: list[str] = Field(
        default_factory=list, description="Only versions carrying one of these labels"
    )
    sites: list[str] = Field(min_length=1)
    keep_last: int = Field(default=1, ge=1, le=1000)
    lifetime_hours: float | None = Field(default=None, gt=0)
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)

    @property
    def holder(self) -> str:
        return f"policy:{self.name}"


class PolicyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: list[Policy] = Field(default_factory=list)


class PolicyEngine:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        state: EngineState,
        store: ManifestStore,
        replication: ReplicationService,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.state = state
        self.store = store
        self.replication = replication

    # -- the file ---------------------------------------------------------------------------

    def check(self, path: Path | str) -> list[Policy]:
        """Parse and validate a policy file (sites must be configured). Changes nothing."""
        file = Path(path)
        try:
            doc = tomllib.loads(file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise UserError(f"cannot read {file}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{file}: not TOML: {exc}") from exc
        try:
            policies = PolicyFile.model_validate(doc).policy
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise UserError(f"{file}: {where}: {first.get('msg')}") from exc
        names = [p.name for p in policies]
        if len(set(names)) != len(names):
            raise UserError(f"{file}: policy names must be unique, got {names}")
        for p in policies:
            unknown = sorted(set(p.sites) - set(self.settings.sites))
            if unknown:
                raise UserError(f"{file}: policy {p.name!r}: unknown site(s) {unknown}")
        return policies

    def apply(self, path: Path | str) -> list[Policy]:
        """Store the file's policies (replacing those of the same names) and evaluate them."""
        policies = self.check(path)
        with write_transaction(self.engine) as conn:
            for p in policies:
                conn.execute(sa.delete(PolicyRow).where(col(PolicyRow.name) == p.name))
                conn.execute(
                    sa.insert(PolicyRow).values(
                        name=p.name,
                        document=p.model_dump(mode="json"),
                        applied_at=datetime.now(UTC),
                    )
                )
        for p in policies:
            self._evaluate(p, None)
        return policies

    def remove(self, name: str) -> bool:
        """Forget a policy and drop its pins (its placements stay, now evictable)."""
        with write_transaction(self.engine) as conn:
            gone = conn.execute(sa.delete(PolicyRow).where(col(PolicyRow.name) == name))
        self.state.staging.unpin(f"policy:{name}")
        return bool(gone.rowcount)

    def list(self) -> list[Policy]:
        with self.engine.connect() as conn:
            docs = conn.execute(sa.select(col(PolicyRow.document)).order_by(col(PolicyRow.name)))
            rows = list(docs.scalars())
        try:
            return [Policy.model_validate(d) for d in rows]
        except ValidationError as exc:  # only a hand-edited database gets here
            raise ConfigError(f"a stored policy is invalid: {exc}") from exc

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, dataset: str | None = None) -> int:
        """Apply every stored policy (to ``dataset`` only, when given); returns how many
        (version, site) placements were ensured."""
        return sum(self._evaluate(p, dataset) for p in self.list())

    def on_event(self, event: Event) -> None:
        if isinstance(event, VersionRegistered | LabelMoved):
            self.evaluate(event.dataset)

    def _evaluate(self, policy: Policy, only: str | None) -> int:
        ensured = 0
        names = [only] if only is not None else self.store.list_datasets()
        for dataset in names:
            if not any(fnmatch.fnmatchcase(dataset, g) for g in policy.datasets):
                continue
            versions = [
                v
                for v in self.store.list_versions(dataset)  # newest first
                if not policy.labels or set(policy.labels) & set(v.labels)
            ]
            keep = versions[: policy.keep_last]
            for v in keep:
                for site in policy.sites:
                    if self._backing_off(v.version_id, site):
                        continue
                    st = self.replication.replicate(
                        f"{v.dataset}@{v.version_id}",
                        site,
                        priority=policy.priority,
                        origin=policy.holder,
                    )
                    expires = None
                    if policy.lifetime_hours is not None:
                        expires = st.created_at + timedelta(hours=policy.lifetime_hours)
                    self.state.staging.pin(st.id, policy.holder, expires)
                    ensured += 1
            self._unpin_older(policy, dataset, {v.version_id for v in keep})
        return ensured

    def _backing_off(self, version_id: str, site: str) -> bool:
        """Whether the version's placement at ``site`` FAILED too recently (or too often)
        for a policy to retry it now."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(col(Placement.id), col(Placement.state)).where(
                    col(Placement.version_id) == version_id, col(Placement.site) == site
                )
            ).one_or_none()
            if row is None or row.state != PlacementState.FAILED:
                return False
            failures, last = conn.execute(
                sa.select(sa.func.count(), sa.func.max(col(PlacementHistory.at))).where(
                    col(PlacementHistory.placement_id) == row.id,
                    col(PlacementHistory.state) == PlacementState.FAILED,
                )
            ).one()
        if failures >= RETRY_LIMIT:
            return True
        wait = min(RETRY_LONGEST, RETRY_FIRST * 2 ** max(0, failures - 1))
        return bool(datetime.now(UTC) < (as_utc(last) or datetime.now(UTC)) + wait)

    def _unpin_older(self, policy: Policy, dataset: str, kept: set[str]) -> None:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(col(Placement.id), col(Placement.version_id)).where(
                    col(Placement.dataset) == dataset, col(Placement.site).in_(policy.sites)
                )
            ).all()
        older = [int(pid) for pid, vid in rows if vid not in kept and pid is not None]
        if older:
            self.state.staging.unpin(policy.holder, older)
