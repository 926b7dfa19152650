"""Operator commands: pause and resume a site, retry a placement now.

``pause`` holds every task that reads from or writes to a site (maintenance on a file
system, an endpoint known to be failing) until ``--until`` or ``resume``; running tasks
finish, attempts are not counted. ``retry`` plans a FAILED or DAMAGED placement anew, or
makes the backing-off tasks of one in progress due now. The same as ``POST
/api/v1/sites/{site}/pause|resume`` and ``/placements/{id}/retry`` (role ``ops``).
"""

from __future__ import annotations

from typing import Annotated

import typer

from datasync.cli.helpers import JsonOpt, application, print_json
from datasync.cli.replication import status_line
from datasync.errors import UserError
from datasync.transfer.status import parse_deadline

__all__ = ["LOCAL_OPERATOR", "commands"]

commands = typer.Typer()
LOCAL_OPERATOR = "local"  # who paused, when it was the CLI on a host with the database


@commands.command()
def pause(
    site: Annotated[str, typer.Argument(help="The site to pause.")],
    reason: Annotated[str, typer.Option("--reason", help="Why: status and explain show it.")],
    until: Annotated[
        str, typer.Option("--until", help="When it ends: ISO 8601, or +30m/+2h/+1d.")
    ] = "+1h",
    as_json: JsonOpt = False,
) -> None:
    """Claim no task of SITE (as source or destination) until --until or `resume`."""
    with application() as app:
        when = parse_deadline(until)
        if when is None:
            raise UserError("give the pause an end: --until +2h or an ISO 8601 time")
        pause = app.replication.pause_site(site, when, reason, LOCAL_OPERATOR)
    if as_json:
        print_json({"site": pause.site, "until": pause.until.isoformat(), "reason": pause.reason})
    else:
        typer.echo(f"{pause.site}: paused until {pause.until.isoformat(timespec='seconds')}")


@commands.command()
def resume(
    site: Annotated[str, typer.Argument(help="The paused site.")], as_json: JsonOpt = False
) -> None:
    """Lift the pause of SITE: its tasks are claimed again at once."""
    with application() as app:
        resumed = app.replication.resume_site(site, LOCAL_OPERATOR)
    if as_json:
        print_json({"site": site, "resumed": resumed})
    else:
        typer.echo(f"{site}: resumed" if resumed else f"{site}: was not paused")


@commands.command()
def retry(
    ref: Annotated[str, typer.Argument(help="DATASET@REF of the placement.")],
    site: Annotated[str, typer.Option("--site", help="The placement's site.")],
    as_json: JsonOpt = False,
) -> None:
    """Try the placement of REF at --site again now (FAILED: planned anew)."""
    with application() as app:
        result = app.replication.retry(app.replication.placement_of(ref, site))
    if as_json:
        print_json(result)
    else:
        typer.echo(status_line(result))
