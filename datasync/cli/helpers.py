"""What every ``datasync`` command shares: error handling, the application, JSON output.

* ``handle_errors()`` turns a ``DatasyncError`` into one line, ``datasync: error: MESSAGE``,
  on stderr: exit 2 for bad input (``UserError``), 1 for anything else. No traceback.
  Ctrl-C exits 130 with a line that says what is true afterwards (``interrupted``).
* ``application()`` builds the ``App`` (settings, migrated database, services) inside that
  error handling, and closes it afterwards. Only commands that can store something in an
  empty database (``creates=True``) may create an SQLite file (``config.check_database``).
* ``print_json`` writes exactly one JSON document on stdout (``--json``, ``JsonOpt``).

Command modules import this module; nothing here imports a command module.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from datasync.bootstrap import App, bootstrap
from datasync.config import check_database, load_settings
from datasync.errors import DatasyncError, UserError

__all__ = ["JsonOpt", "application", "handle_errors", "parse_size", "print_json"]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str) -> int:
    """``64MiB``, ``64M`` and ``64mib`` are 64 * 2**20; ``64MB`` is 64 * 10**6; plain bytes."""
    match = _SIZE_RE.match(text)
    if not match:
        raise UserError(f"bad size {text!r}: use bytes or a unit like 64MiB, 1GiB, 512KiB")
    number, unit, suffix = match.groups()
    power = _POWERS[unit.lower()]
    decimal = suffix.lower() == "b" and unit != ""
    base = 1000 if decimal else 1024
    return int(number) * int(base**power)


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"datasync: error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def handle_errors(interrupted: str = "interrupted") -> Iterator[None]:
    """Turn every datasync error into one line on stderr and an exit code; Ctrl-C prints
    ``interrupted`` (what is true afterwards) and exits 130."""
    try:
        yield
    except UserError as exc:
        raise _fail(exc.message, 2) from None
    except DatasyncError as exc:
        raise _fail(exc.message, 1) from None
    except KeyboardInterrupt:
        raise _fail(interrupted, 130) from None


@contextmanager
def application(*, creates: bool = False, interrupted: str = "interrupted") -> Iterator[App]:
    """The ``App`` from the environment's settings, with ``handle_errors`` around it.

    ``creates``: the command can store something in an empty database, so it may create
    a new SQLite file; others refuse a database file that does not exist."""
    with handle_errors(interrupted):
        settings = load_settings()
        check_database(settings, creates=creates)
        with bootstrap(settings) as app:
            yield app


def print_json(value: BaseModel | list[Any] | dict[str, Any]) -> None:
    data = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
