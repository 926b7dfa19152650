"""Job-facing commands: stage (version V at site S before my job starts), release, explain.

``stage`` exit codes, which hooks rely on: 0 READY (or recorded, without ``--wait``),
2 bad input (unknown dataset, ref or site; a bad deadline), 3 ``--wait`` timed out (the
request stays), 4 a permanent failure (the reason is printed), 1 anything else.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from datasync.cli.helpers import JsonOpt, application, print_json
from datasync.errors import UserError
from datasync.placement.policies import Policy
from datasync.placement.staging import StageResult
from datasync.textfmt import human_bytes
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


@commands.command()
def explain(
    ref: Annotated[str, typer.Argument(help="DATASET@REF.")],
    site: Annotated[str, typer.Option("--site", help="The site it should be at.")],
    as_json: JsonOpt = False,
) -> None:
    """Why version REF is (not yet) at SITE: phases, queue position, blockers, errors."""
    with application() as app:
        why = app.explainer.explain_ref(ref, site)
    if as_json:
        print_json(why)
        return
    p = why.placement
    typer.echo(why.summary)
    typer.echo(
        f"  files {p.files_done:,}/{p.files_total:,}, bytes {p.bytes_done:,}/{p.bytes_total:,}"
        f", moved {p.bytes_moved:,}; ETA {p.eta_seconds if p.eta_seconds is not None else '-'} s"
        + ("" if why.slack_seconds is None else f"; slack {why.slack_seconds:.0f} s")
    )
    if why.queue_position is not None:
        typer.echo(f"  queue position: {why.queue_position}")
    for phase in why.phases:
        note = f"  ({phase.note})" if phase.note else ""
        when = f"{phase.since:%Y-%m-%d %H:%M:%S}"
        typer.echo(f"  {when}  {phase.phase:<12} {phase.seconds:8.1f} s{note}")
    for blocker in why.blockers:
        typer.echo(f"  blocked: {blocker}")
    for pin in why.pins:
        typer.echo(f"  pinned by {pin}")
    for link, rate in why.links.items():
        typer.echo(f"  link {link}: {rate / 1e6:,.1f} MB/s expected")
    for err in why.last_errors:
        task = f"task {err['task']} ({err['kind']}, {err['state']})"
        typer.echo(f"  {task}: {err['class']}: {err['message']}")


@commands.command()
def gc(
    site: Annotated[str, typer.Argument(help="The site to make room at.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be evicted; change nothing.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Evict least-recently-used unpinned versions while SITE is over its quota, and delete
    blobs no placement needs. Nothing pinned is ever evicted."""
    with application() as app:
        plan = app.evictor.run(site, dry_run=dry_run)
    if as_json:
        print_json(
            {
                "site": plan.site,
                "quota_bytes": plan.quota,
                "used_bytes": plan.used,
                "pending_bytes": plan.pending,
                "evict": [
                    {"placement": c.placement_id, "ref": c.ref, "frees_bytes": c.frees}
                    for c in plan.evict
                ],
                "orphan_bytes": plan.orphans,
                "frees_bytes": plan.frees,
                "pinned": plan.pinned,
                "fits": plan.fits,
                "done": plan.done,
            }
        )
        return
    verb = "would evict" if dry_run else "evicted"
    quota = "no quota" if plan.quota is None else f"quota {human_bytes(plan.quota)}"
    typer.echo(f"{site}: {human_bytes(plan.used)} used, {quota}")
    for c in plan.evict:
        typer.echo(f"  {verb} {c.ref} (#{c.placement_id}): frees {human_bytes(c.frees)}")
    if plan.orphans:
        typer.echo(f"  {verb} blobs no placement needs: {human_bytes(plan.orphans)}")
    for ref in plan.pinned:
        typer.echo(f"  kept (pinned): {ref}")
    if not plan.fits:
        typer.echo(f"  still over quota: {plan.shortfall()}")


policy = typer.Typer(help="Declarative placement policies (TOML files).")
commands.add_typer(policy, name="policy")


def _policy_rows(policies: list[Policy]) -> list[dict[str, object]]:
    return [p.model_dump(mode="json") for p in policies]


@policy.command("check")
def policy_check(
    file: Annotated[Path, typer.Argument(help="A policy file (TOML, [[policy]] tables).")],
    as_json: JsonOpt = False,
) -> None:
    """Validate a policy file against the configuration; change nothing."""
    with application() as app:
        found = app.policies.check(file)
    if as_json:
        print_json(_policy_rows(found))
    else:
        typer.echo(f"{file}: {len(found)} valid polic{'y' if len(found) == 1 else 'ies'}")


@policy.command("apply")
def policy_apply(
    file: Annotated[Path, typer.Argument(help="A policy file (TOML, [[policy]] tables).")],
    as_json: JsonOpt = False,
) -> None:
    """Store the file's policies (by name) and place what they ask for at once."""
    with application(creates=True) as app:
        applied = app.policies.apply(file)
    if as_json:
        print_json(_policy_rows(applied))
    else:
        for p in applied:
            typer.echo(f"applied {p.name}: {', '.join(p.datasets)} -> {', '.join(p.sites)}")


@policy.command("list")
def policy_list(as_json: JsonOpt = False) -> None:
    """The policies in force."""
    with application() as app:
        found = app.policies.list()
    if as_json:
        print_json(_policy_rows(found))
        return
    if not found:
        typer.echo("no policies: `datasync policy apply FILE`")
    for p in found:
        labels = f" labels {', '.join(p.labels)}" if p.labels else ""
        life = f", pins last {p.lifetime_hours:g} h" if p.lifetime_hours else ""
        typer.echo(
            f"{p.name}: {', '.join(p.datasets)}{labels} -> {', '.join(p.sites)}"
            f" (keep last {p.keep_last}, priority {p.priority}{life})"
        )


@policy.command("remove")
def policy_remove(
    name: Annotated[str, typer.Argument(help="The policy to forget.")],
) -> None:
    """Forget a policy and drop its pins (its placements stay, and may be evicted)."""
    with application() as app:
        if not app.policies.remove(name):
            raise UserError(f"no policy named {name!r}")
    typer.echo(f"removed {name}")
