"""The ``datasync`` typer application: thin commands over the application's services.

Imported only when a command runs (``datasync.cli.main``), never by the package itself:
worker processes are spawned from the console script and must not pay for typer, rich
and every command module (docs/design.md, "Worker start").

Every command that prints a result takes ``--json`` and then prints exactly one JSON
document on stdout. Errors never show a traceback: ``datasync: error: <message>`` on
stderr, exit 2 for bad input (``UserError``) or 1 for anything else (``helpers``).

Commands live by area: ``manifests`` (register, datasets, versions, show, diff, label,
export), ``replication`` (replicate, status, sites), ``placement`` (stage, release,
explain, gc, policy), ``integrity`` (verify, audit), ``daemons`` (serve, worker, up),
``tokens`` (``token create|list|revoke``).
They import ``helpers``; only this module imports them.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from datasync import __version__
from datasync.cli import daemons, integrity, manifests, operate, placement, replication, tokens
from datasync.cli.helpers import parse_size

__all__ = ["app", "main", "parse_size"]

app = typer.Typer(
    name="datasync",
    help="Verified, content-addressed dataset versions and replication.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for _area in (manifests, replication, placement, operate, integrity, daemons):
    app.add_typer(_area.commands)
app.add_typer(tokens.commands, name="token")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"datasync {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Register dataset versions and inspect them. Config: $DATASYNC_HOME/datasync.toml."""


def main() -> None:
    """Console-script entry point: this process logs (``DATASYNC_LOG``, at WARNING by
    default; daemons raise it to INFO) and counts its events in the host's metrics."""
    from datasync.observe.exposition import record_host_metrics
    from datasync.observe.logs import setup_logging

    try:
        setup_logging(default_level=logging.WARNING)
    except ValueError as exc:
        typer.echo(f"datasync: error: {exc}", err=True)
        raise SystemExit(2) from None
    record_host_metrics()
    app()
