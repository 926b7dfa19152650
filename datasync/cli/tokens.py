"""``datasync token create|list|revoke``: API tokens, managed locally.

These commands use the token service directly, not the HTTP API: whoever can run
``datasync`` against the database is trusted like ``admin``. Each of them first makes sure
an admin token exists (the embedded default, ``$DATASYNC_HOME/admin.token``, mode 0600),
as ``serve`` and ``up`` do. ``create`` prints the new token once; nothing shows it again.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from datasync.auth.roles import Role
from datasync.auth.tokens import TokenInfo, TokenService, parse_expiry, write_private
from datasync.cli.helpers import JsonOpt, application, print_json
from datasync.errors import UserError

__all__ = ["commands", "ensure_admin_token"]

commands = typer.Typer(help="Create, list and revoke API tokens.", no_args_is_help=True)


def ensure_admin_token(tokens: TokenService, home: Path) -> None:
    """The embedded default: an admin token in ``home/admin.token`` if there is none."""
    path = tokens.ensure_admin(home)
    if path is not None:  # say where, never what
        print(f"datasync: created an admin token in {path} (mode 0600)", file=sys.stderr)


def _when(value: object) -> str:
    return "-" if value is None else str(value)[:19]


def _table(rows: list[TokenInfo]) -> Table:
    table = Table("name", "role", "namespaces", "state", "created", "expires", "last used")
    for t in rows:
        table.add_row(
            t.name,
            t.role.value,
            ", ".join(t.namespaces) or "-",
            t.state,
            _when(t.created_at),
            _when(t.expires_at),
            _when(t.last_used_at),
        )
    return table


@commands.command()
def create(
    name: Annotated[str, typer.Argument(help="A unique name, e.g. slurm-hook or drive-owner.")],
    role: Annotated[Role, typer.Option("--role", "-r", help="owner, hook, ops or admin.")],
    namespace: Annotated[
        list[str] | None,
        typer.Option("--namespace", "-n", help="A namespace an owner token owns (repeatable)."),
    ] = None,
    expires: Annotated[
        str | None, typer.Option(help="When it stops working: +30d, +12h or ISO 8601.")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the token to this file (mode 0600)."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Issue a token and print it once (or write it to --output)."""
    with application(creates=True) as app:  # the first token may come before anything else
        ensure_admin_token(app.tokens, app.settings.home)
        issued = app.tokens.create(name, role, namespace or (), expires_at=parse_expiry(expires))
        if output is not None:
            try:
                write_private(output, issued.token + "\n")
            except OSError as exc:
                app.tokens.revoke(name)  # nobody holds it: it must not stay valid
                raise UserError(f"cannot write {output}: {exc.strerror}; token revoked") from exc
    if json_out:
        data = issued.model_dump(mode="json")
        if output is not None:
            data.pop("token")
            data["file"] = str(output)
        print_json(data)
    elif output is not None:
        typer.echo(f"token {name!r} ({role.value}) written to {output}")
    else:
        typer.echo(issued.token)
        typer.echo(f"token {name!r} ({role.value}): shown this once; store it now", err=True)


@commands.command("list")
def list_tokens(json_out: JsonOpt = False) -> None:
    """Every token: name, role, namespaces, state (never the token itself)."""
    with application() as app:
        ensure_admin_token(app.tokens, app.settings.home)
        rows = app.tokens.list()
    if json_out:
        print_json([t.model_dump(mode="json") for t in rows])
    else:
        Console(width=160).print(_table(rows))


@commands.command()
def revoke(
    name: Annotated[str, typer.Argument(help="The token's name.")],
    json_out: JsonOpt = False,
) -> None:
    """Revoke a token: it authenticates nobody from now on."""
    with application() as app:
        ensure_admin_token(app.tokens, app.settings.home)
        info = app.tokens.revoke(name)
    if json_out:
        print_json(info)
    else:
        typer.echo(f"token {name!r} revoked at {info.revoked_at}")
