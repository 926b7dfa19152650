"""What a dataset's labels should say at a site: read from the database, written by the
``labels`` task and at the end of every publish (``views.sync_labels``).

A label points at its version at a site only where that version's view is published
(its placement there is READY, or it is the view being published now); elsewhere the
label must be absent.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import col

from datasync.db.tables import Dataset, Label, Version
from datasync.db.transfer_tables import Placement
from datasync.models import PlacementState

__all__ = ["labels_at_site", "sites_showing"]


def labels_at_site(
    engine: Engine, dataset: str, site: str, *, publishing: str | None = None
) -> dict[str, str | None]:
    """``label -> version id`` for the labels of ``dataset`` whose version is published at
    ``site`` (``publishing``: a version id counted as published), ``None`` for the rest."""
    with engine.connect() as conn:
        labels = conn.execute(
            sa.select(col(Label.name), col(Version.version_id))
            .join(Version, col(Version.pk) == col(Label.version_pk))
            .join(Dataset, col(Dataset.pk) == col(Label.dataset_pk))
            .where(col(Dataset.name) == dataset)
        ).all()
        ready = set(
            conn.execute(
                sa.select(col(Placement.version_id)).where(
                    col(Placement.dataset) == dataset,
                    col(Placement.site) == site,
                    col(Placement.state) == PlacementState.READY,
                )
            ).scalars()
        )
    if publishing is not None:
        ready.add(publishing)
    return {str(name): (str(vid) if vid in ready else None) for name, vid in labels}


def sites_showing(engine: Engine, dataset: str) -> dict[str, int]:
    """Sites holding a published view of ``dataset``: ``site -> one such placement id``
    (the one a labels task is filed under)."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(col(Placement.site), sa.func.max(col(Placement.id)))
            .where(col(Placement.dataset) == dataset, col(Placement.state) == PlacementState.READY)
            .group_by(col(Placement.site))
        ).all()
    return {str(site): int(pid) for site, pid in rows if pid is not None}
