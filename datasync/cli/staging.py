"""Job-facing commands: stage (version V at site S before my job starts), release.

``stage`` exit codes, which hooks rely on: 0 READY (or recorded, without ``--wait``),
2 bad input (unknown dataset, ref or site; a bad deadline), 3 ``--wait`` timed out (the
request stays), 4 a permanent failure (the reason is printed), 1 anything else.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from datasync.cli.helpers import JsonOpt, application, print_json
from datasync.errors import UserError
from datasync.placement.staging import StageResult
from datasync.transfer.status import parse_deadline

__all__ = ["EXIT_FAILED", "EXIT_TIMEOUT", "commands"]

commands = typer.Typer()
EXIT_TIMEOUT = 3
EXIT_FAILED = 4


def _line(r: StageResult) -> str:
    eta = "" if r.eta_seconds is None else f"  ETA {r.eta_seconds:.0f}s"
    risk = "  AT RISK" if r.at_risk else ""
    where = f"  {r.path}" if r.path else ""
    return f"{r.ref} at {r.site}: {r.state}{eta}{risk}{where}"


@commands.command()
def stage(
    ref: Annotated[str, typer.Argument(help="DATASET@REF the job needs.")],
    site: Annotated[str, typer.Option("--site", help="The site the job runs at.")],
    deadline: Annotated[
        str | None,
        typer.Option("--deadline", help="When the job starts: ISO 8601 or +2h/+30m/+1d."),
    ] = None,
    job_id: Annotated[
        str | None,
        typer.Option("--job-id", help="The job's id: requests are idempotent per job."),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Block until READY; then print the view's path.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="With --wait: give up after S seconds.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check DATASET@REF and SITE; record nothing.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Make sure version REF is (or will be) at SITE for a job, and pin it there.

    Exit codes: 0 ready (or recorded), 2 bad input, 3 timed out, 4 failed for good."""
    with application() as app:
        if timeout is not None and timeout < 0:
            raise UserError(f"--timeout {timeout}: must be 0 or more seconds")
        when = parse_deadline(deadline)
        result = app.staging.stage(ref, site, deadline=when, job_id=job_id, dry_run=dry_run)
        outcome = "recorded"
        if wait and not dry_run:
            console = Console(stderr=True)
            shown: list[str] = []

            def progress(r: StageResult, idle: str | None) -> None:
                line = _line(r) + (f"\n  {idle}" if idle else "")
                if not as_json and (not shown or shown[-1] != line):
                    console.print(line, highlight=False)
                    shown.append(line)

            waited = app.staging.wait(result, timeout, on_update=progress)
            result, outcome = waited.result, waited.outcome
        elif result.state == "READY":
            outcome = "ready"
        elif result.state in ("FAILED", "EVICTED"):
            outcome = "failed"
    if as_json:
        print_json(result)
    elif result.path and outcome == "ready":
        typer.echo(result.path)
    else:
        typer.echo(_line(result))
    if outcome == "failed":
        print(f"datasync: error: {result.reason or result.state}", file=sys.stderr)
        raise typer.Exit(EXIT_FAILED)
    if outcome == "timeout":
        print(
            f"datasync: still {result.state} after {timeout:g} s; the request stays"
            f" (job {result.job_id})",
            file=sys.stderr,
        )
        raise typer.Exit(EXIT_TIMEOUT)


@commands.command()
def release(
    job_id: Annotated[str, typer.Option("--job-id", help="The job whose pins to drop.")],
    ref: Annotated[str | None, typer.Argument(help="Only this DATASET@REF (or DATASET).")] = None,
    site: Annotated[str | None, typer.Option("--site", help="Only at this site.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Release a job's stage requests: their versions may be evicted again."""
    with application() as app:
        released = app.staging.release(job_id, ref, site)
    if as_json:
        print_json({"job_id": job_id, "released": released})
    else:
        typer.echo(f"released {len(released)} placement(s) of job {job_id}")
