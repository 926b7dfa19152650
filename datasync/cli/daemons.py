"""Long-running commands: serve, worker, up.

They run until stopped and log instead of printing results. ``worker`` and ``up`` supervise
worker processes (``datasync.transfer.supervisor``): SIGTERM or SIGINT stops the whole
tree, and the children die with a parent killed outright. ``--processes`` is 1 to
``MAX_PROCESSES_PER_CPU`` per CPU; more needs ``--force``. The in-process mode
(``processes=0``) is for Python callers only.

They log at INFO (``--log-level``, else ``DATASYNC_LOG``), as JSON lines unless stderr is a
terminal (``--log-format``, else ``DATASYNC_LOG_FORMAT``); their worker processes log the
same way. ``serve`` and ``up`` serve ``/metrics`` (every datasync process of the host, and
the database's state) and the dashboard at ``/ui``; ``worker --metrics-port`` serves the
host's event metrics for hosts without an API server.

``serve`` and ``up`` create the embedded admin token on first start
(``$DATASYNC_HOME/admin.token``, mode 0600), serve HTTPS with ``--tls-cert``/``--tls-key``
(uvicorn's ``ssl_certfile``/``ssl_keyfile``), and refuse request bodies over
``--max-body`` (JSON routes) or ``--max-upload`` (manifest uploads) with 413.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from datasync.cli.helpers import application, handle_errors, parse_size
from datasync.cli.tokens import ensure_admin_token
from datasync.errors import DatasyncError, UserError

if TYPE_CHECKING:
    import uvicorn
    from apscheduler.schedulers.background import BackgroundScheduler

    from datasync.bootstrap import App

__all__ = ["MAX_PROCESSES_PER_CPU", "commands", "start_maintenance"]

log = logging.getLogger(__name__)

commands = typer.Typer()
MAX_PROCESSES_PER_CPU = 4
REPLAN_EVERY_SECONDS = 60
# Shorter leases than this would be renewed so often that a busy host loses them.
MIN_LEASE_SECONDS = 3.0
AUDIT_EVERY_HOURS = 24.0

_PER_CPU = f"{MAX_PROCESSES_PER_CPU} per CPU"
ProcessesOpt = Annotated[
    int, typer.Option("--processes", "-p", help=f"Worker processes: 1 to {_PER_CPU}.")
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help=f"Allow more worker processes than {_PER_CPU}.")
]
LogLevelOpt = Annotated[
    str | None,
    typer.Option(
        "--log-level", help="DEBUG, INFO, WARNING or ERROR (default: $DATASYNC_LOG or INFO)."
    ),
]
LogFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--log-format",
        help="json, human or auto (human on a terminal; default: $DATASYNC_LOG_FORMAT or auto).",
    ),
]


def _logging(level: str | None, fmt: str | None) -> None:
    from datasync.observe.logs import setup_logging

    with handle_errors():
        try:
            setup_logging(level, fmt, default_level=logging.INFO)
        except ValueError as exc:
            raise UserError(str(exc)) from None


TlsCertOpt = Annotated[
    Path | None, typer.Option("--tls-cert", help="PEM certificate (chain): serve HTTPS.")
]
TlsKeyOpt = Annotated[Path | None, typer.Option("--tls-key", help="PEM private key of --tls-cert.")]
MaxBodyOpt = Annotated[
    str, typer.Option("--max-body", help="Largest JSON request body (413 above it).")
]
MaxUploadOpt = Annotated[
    str, typer.Option("--max-upload", help="Largest manifest upload (413 above it).")
]
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _api_server(
    app: App,
    host: str,
    port: int,
    tls: tuple[Path | None, Path | None],
    sizes: tuple[str, str],
) -> uvicorn.Config:
    """The API's uvicorn configuration: TLS, body limits, and the embedded admin token."""
    import uvicorn  # deferred: only the daemons need the web server

    from datasync.api.app import create_app
    from datasync.api.limits import BodyLimits

    cert, key = tls
    if (cert is None) != (key is None):
        raise UserError("--tls-cert and --tls-key go together: give both or neither")
    for path in (cert, key):
        if path is not None and not path.is_file():
            raise UserError(f"{path}: no such file (TLS)")
    limits = BodyLimits(json_bytes=parse_size(sizes[0]), upload_bytes=parse_size(sizes[1]))
    if min(limits.json_bytes, limits.upload_bytes) < 1024:
        raise UserError("--max-body and --max-upload must be at least 1KiB")
    if cert is None and host not in _LOOPBACK:
        log.warning("serving on %s without TLS: tokens cross the network in clear", host)
    config = uvicorn.Config(
        create_app(app, limits),
        host=host,
        port=port,
        log_config=None,  # uvicorn's loggers go through the handler _logging installed
        ssl_certfile=str(cert) if cert else None,
        ssl_keyfile=str(key) if key else None,
    )
    try:
        config.load()  # reads the certificate and key now: a bad pair stops nothing running
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"cannot use --tls-cert {cert} with --tls-key {key}: {exc}") from exc
    ensure_admin_token(app.tokens, app.settings.home)  # once nothing else can refuse to start
    return config


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


def _audit_every_site(app: App) -> None:
    """The scheduled audit: lost replicas re-planned, dark files quarantined, each site."""
    for site in sorted(app.settings.sites):
        try:
            app.auditor.audit(site)
        except DatasyncError:
            log.warning("scheduled audit of %s failed", site, exc_info=True)


def start_maintenance(app: App) -> BackgroundScheduler:
    """Periodic chores of ``datasync up``: reap dead leases, re-plan dead planners, keep
    deadlines current, apply policies, verify and audit every site."""
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
    scheduler.add_job(
        _audit_every_site, "interval", args=[app], hours=AUDIT_EVERY_HOURS, id="audit-sites"
    )
    scheduler.start()
    return scheduler


@commands.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8750,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    max_body: MaxBodyOpt = "1MiB",
    max_upload: MaxUploadOpt = "8GiB",
) -> None:
    """Serve the HTTP API (/api/v1, OpenAPI at /docs), /metrics and /ui until interrupted."""
    import uvicorn  # deferred: only the daemons need the web server

    _logging(log_level, log_format)
    with handle_errors():
        _check_port(host, port)
    with application(creates=True) as app:
        config = _api_server(app, host, port, (tls_cert, tls_key), (max_body, max_upload))
        log.info("dashboard at http://%s:%s/ui, metrics at /metrics", host, port)
        uvicorn.Server(config).run()


@commands.command()
def worker(
    processes: ProcessesOpt = 1,
    once: Annotated[
        bool, typer.Option("--once", help="Exit when no task is queued or leased.")
    ] = False,
    force: ForceOpt = False,
    metrics_port: Annotated[
        int | None,
        typer.Option("--metrics-port", help="Serve this host's event metrics on this port."),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option("--metrics-host", help="Address for --metrics-port.")
    ] = "127.0.0.1",
    lease_seconds: Annotated[
        float,
        typer.Option(
            "--lease-seconds",
            min=MIN_LEASE_SECONDS,
            help="How long a claimed task stays leased without a heartbeat (renewed every"
            " third of it): how soon a dead host's tasks are taken over.",
        ),
    ] = 60.0,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Run worker processes that claim and execute transfer tasks (SIGTERM stops them)."""
    from datasync.transfer.supervisor import WorkerOptions, run_worker

    _logging(log_level, log_format)
    with handle_errors():
        _check_processes(processes, force)
    with application(creates=True) as app:
        settings = app.settings
        if metrics_port is not None:
            from prometheus_client import start_http_server

            # Event metrics only: the database's gauges come from the API servers.
            start_http_server(
                metrics_port, metrics_host, registry=app.observability.exposition_events()
            )
            log.info("metrics at http://%s:%s/metrics", metrics_host, metrics_port)
    with handle_errors():
        options = WorkerOptions(lease_seconds=lease_seconds)
        run_worker(settings, processes=processes, once=once, options=options)


@commands.command()
def up(
    host: Annotated[str, typer.Option(help="API address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="API port.")] = 8750,
    processes: ProcessesOpt = 1,
    force: ForceOpt = False,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    max_body: MaxBodyOpt = "1MiB",
    max_upload: MaxUploadOpt = "8GiB",
) -> None:
    """Run the API, the maintenance scheduler and workers together (embedded defaults)."""
    import uvicorn

    from datasync.transfer.supervisor import WorkerPool, stop_on_signals

    _logging(log_level, log_format)
    with handle_errors():
        _check_processes(processes, force)
        _check_port(host, port)
    with application(creates=True) as app:
        config = _api_server(app, host, port, (tls_cert, tls_key), (max_body, max_upload))
        server = uvicorn.Server(config)
        log.info("dashboard at http://%s:%s/ui, metrics at /metrics", host, port)

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
