"""Integrity commands: verify (re-hash views and blobs at a site, repair what is damaged)."""

from __future__ import annotations

from typing import Annotated

import typer

from datasync.cli.helpers import JsonOpt, application, parse_size, print_json
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
