"""The ``datasync`` command line (``commands``: the typer app and its command areas).

This package's ``__init__`` stays cheap to import: the console script imports ``main``
from here, and every ``multiprocessing`` "spawn" child of ``datasync worker``/``up``
re-imports the console script before it runs, so anything imported here is paid again by
each worker process. ``app`` and ``parse_size`` are loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasync.cli.commands import app, parse_size

__all__ = ["app", "main", "parse_size"]


def main() -> None:
    """Console-script entry point (``datasync.cli.commands.main``)."""
    from datasync.cli.commands import main as run

    run()


def __getattr__(name: str) -> Any:
    if name in ("app", "parse_size"):
        from datasync.cli import commands

        return getattr(commands, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
