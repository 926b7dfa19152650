"""Replication commands: replicate, status, sites.

``replicate`` records the placement and plans it; the bytes are moved by workers
(``datasync worker`` or ``datasync up``). ``--wait`` polls until READY or FAILED: a rich
progress bar on a terminal (``watch``), one status line per second elsewhere; Ctrl-C
stops the waiting, not the placement. A placement that is FAILED (already at plan time,
or while waiting) exits 1 with its reason; ``sites`` exits 1 when a probed site is down.
Every command calls ``App.replication`` (``datasync.transfer.service``). The ``status``
table wraps long notes (a failure's whole reason) instead of cutting them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from datasync.cli.helpers import JsonOpt, application, handle_errors, print_json
from datasync.textfmt import human_bytes
from datasync.transfer.sites import SiteInfo
from datasync.transfer.status import PlacementStatus, parse_deadline

__all__ = ["commands", "status_line", "watch"]

commands = typer.Typer()
WAIT_POLL_SECONDS = 1.0


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _percent(p: PlacementStatus) -> str:
    if p.state == "PLANNING" and not p.bytes_total:
        return "-"  # nothing is known yet, certainly not 100%
    return f"{100.0 * p.bytes_done / p.bytes_total if p.bytes_total else 100.0:.0f}%"


def status_line(p: PlacementStatus) -> str:
    """One placement as `replicate` and `status` print it (its phase, its error)."""
    risk = "  AT RISK" if p.at_risk else ""
    text = (
        f"#{p.id} {p.dataset}@{p.version_id[:12]} -> {p.site}: {p.state}  "
        f"{p.files_done:,}/{p.files_total:,} files  "
        f"{human_bytes(p.bytes_done)}/{human_bytes(p.bytes_total)} ({_percent(p)})  "
        f"{human_bytes(p.throughput_bytes_per_second)}/s  ETA {_eta(p.eta_seconds)}{risk}"
    )
    if p.state not in ("READY", "FAILED"):
        text += f"\n  {p.phase}"
    if p.error:
        text += f"\n  error: {p.error}"
    elif p.last_errors:
        last = p.last_errors[0]
        text += f"\n  last error ({last['at']}): {last['class']}: {last['message']}"
    return text


def _status_table(rows: list[PlacementStatus]) -> Table:
    table = Table("id", "version", "site", "state", "files", "bytes", "rate", "ETA")
    # The note takes the room left and wraps: a failure's reason is shown whole.
    table.add_column("note", overflow="fold", ratio=1, min_width=30)
    for p in rows:
        note = p.error or p.phase
        if p.last_errors and not p.error:
            note += f". last error: {p.last_errors[0]['class']}: {p.last_errors[0]['message']}"
        if p.at_risk:
            note = f"deadline at risk. {note}".strip()
        table.add_row(
            str(p.id),
            f"{p.dataset}@{p.version_id[:12]}",
            p.site,
            p.state,
            f"{p.files_done:,}/{p.files_total:,}",
            f"{human_bytes(p.bytes_done)}/{human_bytes(p.bytes_total)}",
            f"{human_bytes(p.throughput_bytes_per_second)}/s",
            _eta(p.eta_seconds),
            note,
        )
    return table


def _sites_table(rows: list[SiteInfo]) -> Table:
    table = Table("site", "url", "backend", "health", "capabilities", "limits")
    for s in rows:
        caps = s.capabilities or {}
        flags = [k for k in ("server_side_copy", "hard_links", "atomic_rename") if caps.get(k)]
        if caps.get("native_checksums"):
            flags.append("checksums:" + ",".join(caps["native_checksums"]))
        health = "-" if s.healthy is None else ("ok" if s.healthy else f"DOWN: {s.error}")
        if s.healthy and s.latency_seconds is not None:
            health = f"ok ({s.latency_seconds * 1000:.0f} ms)"
        limits = f"{s.concurrency} streams"
        if s.bandwidth_mbps:
            limits += f", {s.bandwidth_mbps:g} Mb/s"
        table.add_row(s.name, s.url, s.backend, health, " ".join(flags) or "-", limits)
    return table


def watch(
    first: PlacementStatus,
    poll: Callable[[], PlacementStatus],
    *,
    quiet: bool = False,
    console: Console | None = None,
) -> PlacementStatus:
    """Poll a placement until READY or FAILED, drawing its progress on stderr: a progress
    bar (bytes, rate, ETA) and the phase on a terminal, a status line per poll elsewhere,
    nothing when ``quiet``. Returns the last status."""
    console = console or Console(stderr=True)
    current = first
    if current.state in ("READY", "FAILED"):
        return current
    if quiet or not console.is_terminal:
        while current.state not in ("READY", "FAILED"):
            if not quiet:
                console.print(status_line(current), highlight=False, soft_wrap=True)
            time.sleep(WAIT_POLL_SECONDS)
            current = poll()
        return current
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[phase]}", style="dim"),
    )
    label = f"#{current.id} {current.dataset}@{current.version_id[:12]} -> {current.site}"
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(label, total=current.bytes_total or None, phase=current.phase)
        while True:
            bar.update(
                task,
                total=current.bytes_total or None,
                completed=current.bytes_done,
                phase=f"{current.state}: {current.phase}"
                + ("  AT RISK" if current.at_risk else ""),
            )
            if current.state in ("READY", "FAILED"):
                return current
            time.sleep(WAIT_POLL_SECONDS)
            current = poll()


@commands.command()
def replicate(
    ref: Annotated[str, typer.Argument(help="DATASET@REF (label, id or id prefix).")],
    to: Annotated[str, typer.Option("--to", help="Destination site name.")],
    priority: Annotated[
        int | None, typer.Option("--priority", help="Higher runs first (default 0).")
    ] = None,
    deadline: Annotated[
        str | None,
        typer.Option("--deadline", help="When it must be there: ISO 8601 or +2h/+30m/+1d."),
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="Where the files are (SITE:prefix), if not where REF was registered.",
        ),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until READY (or FAILED); needs workers.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Make sure version REF is (or will be) at site --to; workers move the bytes."""
    with application() as app:
        replication = app.replication
        when = parse_deadline(deadline)
        result = replication.replicate(ref, to, priority=priority, deadline=when, source=source)
        stopped = (
            f"stopped waiting; placement #{result.id} stays queued and workers carry on:"
            f" `datasync status` or `datasync explain {result.dataset}@{result.version_id[:12]}"
            f" --site {result.site}` shows it"
        )
        if wait:
            pid = result.id
            with handle_errors(interrupted=stopped):
                result = watch(
                    result, lambda: replication.status(placement_id=pid)[0], quiet=as_json
                )
    if as_json:
        print_json(result)
    else:
        typer.echo(status_line(result))
    if result.state == "FAILED":
        typer.echo(f"datasync: error: placement #{result.id} FAILED: {result.error}", err=True)
        raise typer.Exit(1)


@commands.command()
def status(
    all_: Annotated[
        bool, typer.Option("--all", help="Include READY and FAILED placements.")
    ] = False,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Only this dataset.")] = None,
    site: Annotated[str | None, typer.Option("--site", help="Only this site.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Placements with files/bytes done and total, throughput, ETA, state and errors."""
    with application() as app:
        rows = app.replication.status(dataset=dataset, site=site, active_only=not all_)
    if as_json:
        print_json([r.model_dump(mode="json") for r in rows])
    elif not rows:
        typer.echo("no placements" + ("" if all_ else " in progress (try --all)"))
    else:
        Console(width=200).print(_status_table(rows))


@commands.command()
def sites(
    probe: Annotated[
        bool, typer.Option("--probe/--no-probe", help="Check each site's health.")
    ] = True,
    timeout: Annotated[float, typer.Option(help="Health probe timeout, seconds.")] = 5.0,
    as_json: JsonOpt = False,
) -> None:
    """Configured sites with their capabilities, limits and health.

    Exits 1 when a probed site is down (its row says why)."""
    with application(creates=True) as app:
        rows = app.replication.sites(probe=probe, timeout=timeout)
    if as_json:
        print_json([r.model_dump(mode="json") for r in rows])
    elif not rows:
        typer.echo("no sites configured: add [sites.NAME] tables to datasync.toml")
    else:
        Console(width=200).print(_sites_table(rows))
    down = [r.name for r in rows if r.healthy is False]
    if down:
        typer.echo(f"datasync: error: site(s) down: {', '.join(down)}", err=True)
        raise typer.Exit(1)
