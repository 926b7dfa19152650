"""Integrity commands: verify (re-hash views and blobs at a site, repair what is damaged) and
audit (compare the site's index with a listing: lost replicas, dark files)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

import typer

from datasync.cli.helpers import JsonOpt, application, parse_size, print_json
from datasync.integrity.audit import DEFAULT_GRACE
from datasync.textfmt import human_bytes

__all__ = ["commands"]

commands = typer.Typer()


@commands.command()
def verify(
    site: Annotated[str, typer.Argument(help="The site to check.")],
    ref: Annotated[
        str | None, typer.Argument(help="Only this version's view and blobs (DATASET@REF).")
    ] = None,
    repair: Annotated[
        bool, typer.Option("--repair", help="Re-plan damaged placements at once (workers fix).")
    ] = False,
    rate: Annotated[
        str | None, typer.Option("--rate", help="Hash at most this many bytes/s, e.g. 200MiB.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-hash SITE's blobs and check its views against the manifests; mark what is damaged.

    Exits 0 when everything is intact, 1 when damage was found (repaired or not)."""
    with application() as app:
        limit = parse_size(rate) if rate is not None else None
        report = app.verifier.verify(site, ref, repair=repair, rate=limit)
    if as_json:
        print_json(
            {
                "site": report.site,
                "clean": report.clean,
                "views_checked": report.views_checked,
                "files_checked": report.files_checked,
                "blobs_checked": report.blobs_checked,
                "bytes_hashed": report.bytes_hashed,
                "bad_blobs": report.bad_blobs,
                "damaged": [
                    {
                        "placement": d.placement_id,
                        "ref": f"{d.dataset}@{d.version_id}",
                        "problems": d.problems,
                        "first": d.first,
                    }
                    for d in report.damaged
                ],
                "repairs_planned": report.repairs_planned,
                "seconds": round(report.seconds, 3),
            }
        )
    else:
        typer.echo(
            f"{site}: {report.views_checked} view(s), {report.files_checked:,} file(s),"
            f" {report.blobs_checked:,} blob(s) checked; {human_bytes(report.bytes_hashed)}"
            f" hashed in {report.seconds:.1f} s"
        )
        for line in report.bad_blobs[:20]:
            typer.echo(f"  bad blob: {line}")
        for d in report.damaged:
            typer.echo(f"  DAMAGED #{d.placement_id} {d.dataset}@{d.version_id[:12]}: ")
            for problem in d.first:
                typer.echo(f"    {problem}")
        if report.repairs_planned:
            typer.echo(f"  repair planned for placement(s) {report.repairs_planned}: run workers")
        elif not report.clean:
            typer.echo(f"  run `datasync verify {site} --repair` to move them again")
        else:
            typer.echo("  intact")
    if not report.clean:
        raise typer.Exit(1)


@commands.command()
def audit(
    site: Annotated[str, typer.Argument(help="The site to audit.")],
    grace_hours: Annotated[
        float,
        typer.Option(
            "--grace-hours", min=0, help="Leave dark files younger than this alone (hours)."
        ),
    ] = DEFAULT_GRACE.total_seconds() / 3600,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report only: mark, move and plan nothing.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Act even when a tenth or more looks lost or dark.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Compare SITE's index with a listing of its storage: re-plan lost replicas and missing
    views, move dark files to .datasync/quarantine/, report views without a placement.

    Exits 0 when the index and the storage agree, 1 when anything was found."""
    with application() as app:
        report = app.auditor.audit(
            site, grace=timedelta(hours=grace_hours), dry_run=dry_run, force=force
        )
    if as_json:
        print_json(report.summary())
    else:
        typer.echo(
            f"{site}: {report.indexed:,} replica(s) indexed, {report.listed:,} blob(s) listed"
            f" in {report.seconds:.1f} s{' (dry run)' if dry_run else ''}"
        )
        for title, items in (
            ("lost", report.lost),
            ("view missing", report.missing_views),
            ("dark", report.dark),
            ("quarantined", report.quarantined),
            ("view without a placement", report.orphan_views),
        ):
            for line in items[:20]:
                typer.echo(f"  {title}: {line}")
            if len(items) > 20:
                typer.echo(f"  ... and {len(items) - 20:,} more {title}")
        if report.too_young:
            typer.echo(f"  {report.too_young} unindexed file(s) younger than the grace period")
        if report.aborted:
            typer.echo(f"  nothing changed: {report.aborted}")
        elif report.repairs_planned:
            typer.echo(f"  repair planned for placement(s) {report.repairs_planned}: run workers")
        if report.clean:
            typer.echo("  index and storage agree")
    if not report.clean:
        raise typer.Exit(1)
