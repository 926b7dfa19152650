"""Long-running commands: serve, worker, up.

They run until stopped and log instead of printing results. ``worker`` and ``up`` supervise
worker processes (``datasync.transfer.supervisor``): SIGTERM or SIGINT stops the whole
tree, and the children die with a parent killed outright. ``--processes`` is 1 to
``MAX_PROCESSES_PER_CPU`` per CPU; more needs ``--force``. The in-process mode
(``processes=0``) is for Python callers only.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from datasync.cli.helpers import application, handle_errors
from datasync.errors import DatasyncError, UserError

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler

    from datasync.bootstrap import App

__all__ = ["MAX_PROCESSES_PER_CPU", "commands", "start_maintenance"]

log = logging.getLogger(__name__)

commands = typer.Typer()
MAX_PROCESSES_PER_CPU = 4
REPLAN_EVERY_SECONDS = 60

_PER_CPU = f"{MAX_PROCESSES_PER_CPU} per CPU"
ProcessesOpt = Annotated[
    int, typer.Option("--processes", "-p", help=f"Worker processes: 1 to {_PER_CPU}.")
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help=f"Allow more worker processes than {_PER_CPU}.")
]


def _check_processes(processes: int, force: bool) -> None:
    if processes < 1:
        raise UserError(f"--processes {processes}: run at least 1 worker process")
    limit = MAX_PROCESSES_PER_CPU * (os.cpu_count() or 1)
    if processes > limit and not force:
        raise UserError(
            f"--processes {processes} is more than {limit} ({_PER_CPU} on this host);"
            " add --force to start that many"
        )


def _check_port(host: str, port: int) -> None:
    """Refuse a port nothing can listen on (taken, or a bad host) before anything starts:
    ``up`` would otherwise start its workers, then die on the bind."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: use 0 to 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: cannot listen there ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise UserError(
                f"cannot listen on {host}:{port}: {exc.strerror} (another datasync serve/up,"
                " or another program? pick one with --port)"
            ) from None


def _verify_every_site(app: App) -> None:
    """The scheduled verify: each site, within the configured budget and rate, repairing."""
    chores = app.settings.maintenance
    for site in sorted(app.settings.sites):
        try:
            app.verifier.verify(
                site,
                repair=True,
                rate=chores.verify_rate_bytes,
                blob_budget=chores.verify_budget_bytes,
            )
        except DatasyncError:
            log.warning("scheduled verify of %s failed", site, exc_info=True)


def start_maintenance(app: App) -> BackgroundScheduler:
    """Periodic chores of ``datasync up``: reap dead leases, re-plan dead planners."""
    from apscheduler.schedulers.background import BackgroundScheduler

    from datasync.transfer.worker import REAP_EVERY_SECONDS

    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_job(
        app.state.tasks.reap, "interval", seconds=REAP_EVERY_SECONDS, id="reap-leases"
    )
    scheduler.add_job(
        app.replication.replan_stale,
        "interval",
        seconds=REPLAN_EVERY_SECONDS,
        id="replan-stale",
    )
    scheduler.add_job(app.scheduler.tick, "interval", seconds=15, id="deadlines")
    scheduler.add_job(app.policies.evaluate, "interval", minutes=10, id="policies")
    every = app.settings.maintenance.verify_interval_hours
    if every > 0:
        scheduler.add_job(
            _verify_every_site, "interval", args=[app], hours=every, id="verify-sites"
        )
    scheduler.start()
    return scheduler


@commands.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8750,
) -> None:
    """Serve the HTTP API (/api/v1, OpenAPI at /docs) until interrupted."""
    import uvicorn  # deferred: only the daemons need the web server

    from datasync.api.app import create_app

    with handle_errors():
        _check_port(host, port)
    with application(creates=True) as app:
        uvicorn.run(create_app(app), host=host, port=port, log_level="info")


@commands.command()
def worker(
    processes: ProcessesOpt = 1,
    once: Annotated[
        bool, typer.Option("--once", help="Exit when no task is queued or leased.")
    ] = False,
    force: ForceOpt = False,
) -> None:
    """Run worker processes that claim and execute transfer tasks (SIGTERM stops them)."""
    from datasync.transfer.supervisor import run_worker

    with handle_errors():
        _check_processes(processes, force)
    with application(creates=True) as app:
        settings = app.settings
    with handle_errors():
        run_worker(settings, processes=processes, once=once)


@commands.command()
def up(
    host: Annotated[str, typer.Option(help="API address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="API port.")] = 8750,
    processes: ProcessesOpt = 1,
    force: ForceOpt = False,
) -> None:
    """Run the API, the maintenance scheduler and workers together (embedded defaults)."""
    import uvicorn

    from datasync.api.app import create_app
    from datasync.transfer.supervisor import WorkerPool, stop_on_signals

    with handle_errors():
        _check_processes(processes, force)
        _check_port(host, port)
    with application(creates=True) as app:
        server = uvicorn.Server(
            uvicorn.Config(create_app(app), host=host, port=port, log_level="info")
        )

        def shut_down() -> None:
            server.should_exit = True

        # uvicorn swaps in its own SIGTERM/SIGINT handlers while it runs, then restores
        # these and raises the signal again: it lands here, not in the default action that
        # would end this process before its workers.
        with stop_on_signals(shut_down), WorkerPool(app.settings, processes) as pool:
            pool.start()
            scheduler = start_maintenance(app)
            try:
                server.run()
            finally:
                scheduler.shutdown(wait=False)
    print("stopped", file=sys.stderr)
