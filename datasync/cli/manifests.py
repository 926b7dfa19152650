"""Manifest commands: register, datasets, versions, show, diff, label, export.

Thin typer commands over ``DatasyncService`` (``App.service``). With ``--json`` each prints
exactly one JSON document; the progress bar of ``register`` is drawn only on a terminal
without ``--json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from datasync.cli.helpers import JsonOpt, application, handle_errors, parse_size, print_json
from datasync.errors import UserError
from datasync.service import DiffResult, RegisterResult, VersionInfo
from datasync.textfmt import human_bytes

__all__ = ["commands"]

commands = typer.Typer()


def _describe(v: VersionInfo) -> str:
    labels = f"  [{', '.join(v.labels)}]" if v.labels else ""
    unverified = "  (unverified)" if not v.verified else ""
    return (
        f"{v.dataset}@{v.version_id}\n"
        f"  files {v.files:,}  bytes {v.bytes:,} ({human_bytes(v.bytes)})  "
        f"chunk size {human_bytes(v.chunk_size)}  created {v.created_at}{labels}{unverified}"
    )


class _RichProgress:
    """The ``Progress`` protocol drawn as one rich bar: files, bytes/s and ETA."""

    def __init__(self, console: Console) -> None:
        self._bar = Progress(
            TextColumn("[bold]hashing"),
            BarColumn(),
            TextColumn("{task.fields[files]:,}/{task.fields[total_files]:,} files"),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self._task: Any = None

    def start(self, files: int, nbytes: int) -> None:
        self._bar.start()
        self._task = self._bar.add_task("scan", total=nbytes, files=0, total_files=files)

    def update(self, files_done: int, bytes_done: int) -> None:
        self._bar.update(self._task, completed=bytes_done, files=files_done)

    def finish(self) -> None:
        self._bar.stop()


@commands.command()
def register(
    dataset: Annotated[str, typer.Argument(help="Dataset name, e.g. drive/tokyo-urban.")],
    source: Annotated[
        str | None,
        typer.Argument(help="A local directory, or a producer manifest (.jsonl)."),
    ] = None,
    manifest: Annotated[
        Path | None,
        typer.Option("--manifest", help="Register this producer manifest (JSON Lines)."),
    ] = None,
    label: Annotated[str | None, typer.Option("--label", "-l", help="Also set this label.")] = None,
    chunk_size: Annotated[
        str | None, typer.Option("--chunk-size", help="Chunk size, e.g. 64MiB (default 64MiB).")
    ] = None,
    allow_empty: Annotated[
        bool,
        typer.Option("--allow-empty", help="Register a source with no files (refused otherwise)."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Register a new version of DATASET from a directory or a producer manifest."""
    with handle_errors():
        if (source is None) == (manifest is None):
            raise UserError("give exactly one SOURCE: a directory, or --manifest FILE.jsonl")
        chunk = parse_size(chunk_size) if chunk_size is not None else None
    with application(creates=True, interrupted="interrupted; nothing was registered") as app:
        console = Console()
        progress = _RichProgress(console) if console.is_terminal and not as_json else None
        service = app.service
        if manifest is not None:
            if chunk is not None:
                raise UserError("--chunk-size does not apply to a producer manifest")
            result: RegisterResult = service.register_manifest(
                dataset, manifest, label=label, allow_empty=allow_empty
            )
        else:
            assert source is not None
            result = service.register(
                dataset,
                source,
                label=label,
                chunk_size=chunk,
                progress=progress,
                allow_empty=allow_empty,
            )
    if as_json:
        print_json(result)
        return
    verb = "registered" if result.created else "unchanged, already registered as"
    typer.echo(f"{verb} {_describe(result)}")


@commands.command()
def datasets(as_json: JsonOpt = False) -> None:
    """List datasets."""
    with application() as app:
        names = app.service.list_datasets()
    if as_json:
        print_json(names)
        return
    for name in names:
        typer.echo(name)


@commands.command()
def versions(
    dataset: Annotated[str, typer.Argument(help="Dataset name.")], as_json: JsonOpt = False
) -> None:
    """List the versions of DATASET, newest first."""
    with application() as app:
        found = app.service.list_versions(dataset)
    if as_json:
        print_json([v.model_dump(mode="json") for v in found])
        return
    table = Table("version id", "created", "files", "bytes", "labels", "verified")
    for v in found:
        table.add_row(
            v.version_id[:16],
            v.created_at,
            f"{v.files:,}",
            human_bytes(v.bytes),
            ", ".join(v.labels),
            "yes" if v.verified else "no",
        )
    Console(width=max(120, Console().width)).print(table)


@commands.command()
def show(
    ref: Annotated[str, typer.Argument(help="DATASET@REF: a label, a version id or id prefix.")],
    files: Annotated[bool, typer.Option("--files", help="Also list every file.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show a version (and, with --files, its files in canonical order)."""
    with application() as app:
        info = app.service.show(ref)
        listing = app.service.iter_files(ref) if files else None
        if as_json:
            # Stream the file list: a million entries must not be held in memory. It goes
            # under "entries": "files" is already the count.
            head = json.dumps(info.model_dump(mode="json"), ensure_ascii=False)
            if listing is None:
                sys.stdout.write(head + "\n")
                return
            sys.stdout.write(head[:-1] + ', "entries": [')
            for i, f in enumerate(listing):
                sys.stdout.write(("," if i else "") + f.model_dump_json())
            sys.stdout.write("]}\n")
            return
        typer.echo(_describe(info))
        for f in listing or ():
            typer.echo(f"{f.size:>14,}  {f.digest}  {f.path}")


@commands.command()
def diff(
    ref_a: Annotated[str, typer.Argument(help="The older version, DATASET@REF.")],
    ref_b: Annotated[str, typer.Argument(help="The newer version, DATASET@REF.")],
    as_json: JsonOpt = False,
) -> None:
    """Show files added, removed and changed from REF_A to REF_B."""
    with application() as app:
        result: DiffResult = app.service.diff(ref_a, ref_b)
    if as_json:
        print_json(result)
        return
    typer.echo(f"--- {result.old.ref}\n+++ {result.new.ref}")
    for c in result.added:
        typer.echo(f"A {c.path}  ({c.new_size:,} bytes)")
    for c in result.removed:
        typer.echo(f"D {c.path}  ({c.old_size:,} bytes)")
    for c in result.changed:
        typer.echo(f"M {c.path}  ({c.old_size:,} -> {c.new_size:,} bytes)")
    typer.echo(
        f"{len(result.added)} added, {len(result.removed)} removed, {len(result.changed)} changed"
    )


@commands.command()
def label(
    ref: Annotated[str, typer.Argument(help="DATASET@REF to point the label at.")],
    name: Annotated[str, typer.Argument(help="The label, e.g. v3 or 2026-11-20.")],
    as_json: JsonOpt = False,
) -> None:
    """Point label NAME of the dataset at the version REF resolves to (moves it if set)."""
    with application() as app:
        info = app.service.set_label(ref, name)
    if as_json:
        print_json(info)
        return
    typer.echo(f"{info.dataset}@{name} -> {info.version_id}")


@commands.command()
def export(
    ref: Annotated[str, typer.Argument(help="DATASET@REF to export.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write the canonical manifest (JSON Lines) of a version; its sha256 is the id."""
    with application() as app:
        if output is None:
            if as_json:
                raise UserError("--json needs --output FILE (stdout carries the manifest)")
            app.service.export(ref, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return
        tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
        try:
            with tmp.open("wb") as out:
                result = app.service.export(ref, out)
            tmp.replace(output)  # readers never see a half-written manifest
        except OSError as exc:
            raise UserError(f"cannot write {output}: {exc.strerror}") from exc
        finally:
            tmp.unlink(missing_ok=True)
    if as_json:
        print_json({**result.model_dump(mode="json"), "output": str(output)})
        return
    typer.echo(f"wrote {result.bytes_written:,} bytes to {output} ({result.version.ref})")
