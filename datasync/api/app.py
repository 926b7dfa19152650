"""The HTTP API under ``/api/v1``: thin FastAPI routes over ``DatasyncService``.

Same operations, same results as the CLI (both call the service). Errors come back as
``{"error": "<message>"}``: ``UnknownReference`` is 404, invalid content (path, manifest,
file type, request body) is 422, other bad input 400, anything else 500. OpenAPI is at
``/api/v1/openapi.json`` and interactive docs at ``/docs``.

Registering a *directory* names a path on the server's file system, scanned by the
server process; clients elsewhere upload a producer manifest instead.

Outside ``/api/v1``: ``/metrics`` (Prometheus) and the dashboard at ``/ui``
(``datasync.api.ui``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from datasync import __version__
from datasync.bootstrap import App
from datasync.errors import (
    DatasyncError,
    InvalidManifest,
    InvalidPath,
    UnknownReference,
    UnsupportedFileType,
    UserError,
)
from datasync.manifest.refs import check_dataset_name, check_label
from datasync.service import DiffResult, RegisterResult, VersionInfo

__all__ = ["API_PREFIX", "create_app"]

API_PREFIX = "/api/v1"
NDJSON = "application/x-ndjson"
_UPLOAD_CHUNK = 1 << 20


class ErrorBody(BaseModel):
    error: str


class DirectoryRequest(BaseModel):
    path: str = Field(description="A directory on the SERVER's file system.")
    label: str | None = None
    chunk_size: int | None = Field(default=None, description="Bytes; default from config.")


class LabelRequest(BaseModel):
    ref: str = Field(description="DATASET@REF the label should point at.")
    label: str


def _status(exc: DatasyncError) -> int:
    if isinstance(exc, UnknownReference):
        return 404
    if isinstance(exc, InvalidManifest | InvalidPath | UnsupportedFileType):
        return 422
    if isinstance(exc, UserError):
        return 400
    return 500


_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorBody, "description": "Bad input; nothing changed."},
    404: {"model": ErrorBody, "description": "Unknown dataset, label or version."},
    422: {"model": ErrorBody, "description": "Invalid manifest, path or request body."},
}


def create_app(application: App) -> FastAPI:
    """Build the FastAPI app over an already bootstrapped ``App``."""
    service = application.service
    api = FastAPI(
        title="datasync",
        version=__version__,
        description=__doc__,
        openapi_url=f"{API_PREFIX}/openapi.json",
    )

    @api.exception_handler(DatasyncError)
    async def _datasync_error(_request: Request, exc: DatasyncError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=_status(exc))

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}"
            for err in exc.errors()
        ]
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=422)

    @api.get(f"{API_PREFIX}/datasets", responses=_ERRORS)
    def list_datasets() -> list[str]:
        return service.list_datasets()

    @api.get(f"{API_PREFIX}/datasets/{{dataset:path}}/versions", responses=_ERRORS)
    def list_versions(dataset: str) -> list[VersionInfo]:
        """Versions of a dataset, newest first."""
        return service.list_versions(dataset)

    @api.post(
        f"{API_PREFIX}/datasets/{{dataset:path}}/versions/manifest",
        responses=_ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "A producer manifest: JSON Lines, schema in manifests/.",
                "content": {NDJSON: {"schema": {"type": "string"}}},
            }
        },
    )
    async def register_manifest(
        dataset: str, request: Request, label: Annotated[str | None, Query()] = None
    ) -> RegisterResult:
        """Register an uploaded producer manifest (stored unverified; nothing is hashed)."""
        check_dataset_name(dataset)
        if label is not None:
            check_label(label)
        with service.spool() as f:
            async for chunk in request.stream():
                f.write(chunk)
            f.flush()
            return await run_in_threadpool(service.register_manifest, dataset, f.name, label=label)

    @api.post(f"{API_PREFIX}/datasets/{{dataset:path}}/versions/directory", responses=_ERRORS)
    def register_directory(
        dataset: str, body: Annotated[DirectoryRequest, Body()]
    ) -> RegisterResult:
        """Scan and hash a directory ON THE SERVER and register it (may take long)."""
        return service.register_directory(
            dataset, body.path, label=body.label, chunk_size=body.chunk_size
        )

    # Declared before /versions/{ref} so the greedy path converter does not swallow it.
    @api.get(
        f"{API_PREFIX}/versions/{{ref:path}}/manifest",
        responses={**_ERRORS, 200: {"content": {NDJSON: {}}}},
        response_class=StreamingResponse,
    )
    def export_manifest(ref: str) -> StreamingResponse:
        """The canonical manifest (JSON Lines); its sha256 is the version id."""
        info, lines = service.export_stream(ref)
        headers = {"X-Datasync-Version-Id": info.version_id}
        return StreamingResponse(_iterate(lines), media_type=NDJSON, headers=headers)

    @api.get(f"{API_PREFIX}/versions/{{ref:path}}", responses=_ERRORS)
    def show(ref: str) -> VersionInfo:
        """Resolve DATASET@REF (label, id or unique id prefix) and describe the version."""
        return service.show(ref)

    @api.get(f"{API_PREFIX}/diff", responses=_ERRORS)
    def diff(
        old: Annotated[str, Query(description="DATASET@REF")],
        new: Annotated[str, Query(description="DATASET@REF")],
    ) -> DiffResult:
        """Files added, removed and changed from ``old`` to ``new``."""
        return service.diff(old, new)

    @api.put(f"{API_PREFIX}/labels", responses=_ERRORS)
    def set_label(body: LabelRequest) -> VersionInfo:
        """Point a label at a version (moving it if it exists)."""
        return service.set_label(body.ref, body.label)

    from datasync.api.staging_routes import staging_router  # stage requests
    from datasync.api.transfer_routes import transfer_router  # placements, sites

    api.include_router(transfer_router(application, API_PREFIX))
    api.include_router(staging_router(application, API_PREFIX))
    from datasync.api.ui import ops_router  # /metrics, /ui

    api.include_router(ops_router(application))
    return api


def _iterate(lines: Iterator[bytes]) -> Iterator[bytes]:
    # Batch lines into ~1 MiB writes: one socket write per manifest line is slow.
    buffer: list[bytes] = []
    size = 0
    for line in lines:
        buffer.append(line)
        size += len(line)
        if size >= _UPLOAD_CHUNK:
            yield b"".join(buffer)
            buffer, size = [], 0
    if buffer:
        yield b"".join(buffer)
