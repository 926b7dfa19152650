"""The HTTP API under ``/api/v1``: thin FastAPI routes over ``DatasyncService``.

Same operations, same results as the CLI (both call the service). Every route but
``GET /api/v1/health`` needs ``Authorization: Bearer <token>``, and the token's role must
allow the route's action (``datasync.api.auth``; roles in ``datasync.auth.roles``).

Errors come back as ``{"error": "<message>"}``: 401 without a valid token, 403 outside the
token's rights, ``UnknownReference`` 404, invalid content (path, manifest, file type,
request body) 422, other bad input 400, a body over the route's size limit 413. OpenAPI is
at ``/api/v1/openapi.json`` and interactive docs at ``/docs``.

Registering a *directory* names a directory of a configured site (``SITE:path``, or an
absolute path under a POSIX site's root), scanned by the server process; clients elsewhere
upload a producer manifest instead.

Outside ``/api/v1``: ``/metrics`` (Prometheus) and the dashboard at ``/ui``
(``datasync.api.ui``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, Body, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from datasync import __version__
from datasync.api.auth import ReadDatasets, WriteDatasets
from datasync.api.errors import (
    AUTH_RESPONSES,
    ERROR_RESPONSES,
    error_response,
    install_error_handlers,
)
from datasync.api.limits import BodyLimits, LimitBodies
from datasync.api.params import (
    LABEL_PATTERN,
    REF_EXAMPLE,
    REF_PATTERN,
    DatasetPath,
    LabelQuery,
    RefPath,
    RefQuery,
    documented,
)
from datasync.auth.roles import Action
from datasync.backends.registry import parse_url
from datasync.bootstrap import App
from datasync.config import Settings
from datasync.errors import InvalidPath, UserError
from datasync.manifest.refs import check_dataset_name, check_label, parse_ref
from datasync.manifest.remote import parse_source
from datasync.models import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from datasync.service import DiffResult, RegisterResult, VersionInfo
from datasync.transfer.sites import site_for_source

__all__ = ["API_PREFIX", "create_app", "site_directory"]

API_PREFIX = "/api/v1"
NDJSON = "application/x-ndjson"
_UPLOAD_CHUNK = 1 << 20
MANIFEST_UPLOAD = rf"{API_PREFIX}/datasets/.+/versions/manifest"
MANIFEST_EXAMPLE = (
    '{"format":"datasync-producer/1","chunk_size":67108864}\n'
    '{"path":"cam0/000001.jpg","size":5,"digest":"xxh3-128:2d5a8c5e4f0a1b2c3d4e5f60718293a4"}\n'
)


class DirectoryRequest(BaseModel):
    path: str = Field(
        description="A directory on the SERVER: SITE:path, or an absolute path under the "
        "root of a configured POSIX site."
    )
    label: str | None = Field(default=None, json_schema_extra=documented(LABEL_PATTERN))
    chunk_size: int | None = Field(
        default=None,
        description=f"Bytes, {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}; default from config.",
        json_schema_extra={"minimum": MIN_CHUNK_SIZE, "maximum": MAX_CHUNK_SIZE},
    )


class LabelRequest(BaseModel):
    ref: str = Field(
        description="DATASET@REF the label should point at.",
        json_schema_extra=documented(REF_PATTERN, REF_EXAMPLE),
    )
    label: str = Field(json_schema_extra=documented(LABEL_PATTERN, "stable"))


class Health(BaseModel):
    status: str


def create_app(application: App, limits: BodyLimits | None = None) -> FastAPI:
    """Build the FastAPI app over an already bootstrapped ``App``."""
    service = application.service
    api = FastAPI(
        title="datasync",
        version=__version__,
        description=__doc__,
        openapi_url=f"{API_PREFIX}/openapi.json",
        responses=ERROR_RESPONSES,
    )
    api.state.tokens = application.tokens
    api.add_middleware(
        LimitBodies, limits=limits or BodyLimits(), uploads=[("POST", MANIFEST_UPLOAD)]
    )

    install_error_handlers(api)

    @api.get(
        f"{API_PREFIX}/health",
        response_model=Health,
        responses={503: error_response("The database does not answer.")},
    )
    def health() -> JSONResponse:
        """Liveness for load balancers: no token needed; 503 when the database is down."""
        try:
            with application.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa.exc.SQLAlchemyError:
            return JSONResponse({"error": "database unavailable"}, status_code=503)
        return JSONResponse(Health(status="ok").model_dump())

    router = APIRouter(prefix=API_PREFIX, responses=AUTH_RESPONSES, tags=["datasets"])

    @router.get("/datasets")
    def list_datasets(who: ReadDatasets) -> list[str]:
        """Datasets (an owner token sees those of its namespaces)."""
        return [d for d in service.list_datasets() if who.sees(d)]

    @router.get("/datasets/{dataset:path}/versions")
    def list_versions(dataset: DatasetPath, who: ReadDatasets) -> list[VersionInfo]:
        """Versions of a dataset, newest first."""
        who.require(Action.READ_DATASETS, dataset)
        return service.list_versions(dataset)

    @router.post(
        "/datasets/{dataset:path}/versions/manifest",
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "A producer manifest: JSON Lines, schema in manifests/.",
                "content": {NDJSON: {"schema": {"type": "string"}, "example": MANIFEST_EXAMPLE}},
            }
        },
    )
    async def register_manifest(
        dataset: DatasetPath,
        request: Request,
        who: WriteDatasets,
        label: LabelQuery = None,
    ) -> RegisterResult:
        """Register an uploaded producer manifest (stored unverified; nothing is hashed).

        The body is streamed to a spool file, then read line by line: a manifest of
        millions of entries is never held in memory."""
        check_dataset_name(dataset)
        who.require(Action.WRITE_DATASETS, dataset)
        if label is not None:
            check_label(label)
        with service.spool() as f:
            async for chunk in request.stream():
                f.write(chunk)
            f.flush()
            return await run_in_threadpool(service.register_manifest, dataset, f.name, label=label)

    @router.post("/datasets/{dataset:path}/versions/directory")
    def register_directory(
        dataset: DatasetPath, body: Annotated[DirectoryRequest, Body()], who: WriteDatasets
    ) -> RegisterResult:
        """Scan and hash a directory of a configured site ON THE SERVER and register it
        (may take long)."""
        check_dataset_name(dataset)
        who.require(Action.WRITE_DATASETS, dataset)
        source = site_directory(application.settings, body.path)
        return service.register_directory(
            dataset, source, label=body.label, chunk_size=body.chunk_size
        )

    # Declared before /versions/{ref} so the greedy path converter does not swallow it.
    @router.get(
        "/versions/{ref:path}/manifest",
        responses={200: {"content": {NDJSON: {}}}},
        response_class=StreamingResponse,
    )
    def export_manifest(ref: RefPath, who: ReadDatasets) -> StreamingResponse:
        """The canonical manifest (JSON Lines); its sha256 is the version id."""
        who.require(Action.READ_DATASETS, parse_ref(ref).dataset)
        info, lines = service.export_stream(ref)
        headers = {"X-Datasync-Version-Id": info.version_id}
        return StreamingResponse(_iterate(lines), media_type=NDJSON, headers=headers)

    @router.get("/versions/{ref:path}")
    def show(ref: RefPath, who: ReadDatasets) -> VersionInfo:
        """Resolve DATASET@REF (label, id or unique id prefix) and describe the version."""
        who.require(Action.READ_DATASETS, parse_ref(ref).dataset)
        return service.show(ref)

    @router.get("/diff")
    def diff(
        old: Annotated[str, RefQuery("DATASET@REF: the version to compare from.")],
        new: Annotated[str, RefQuery("DATASET@REF: the version to compare to.")],
        who: ReadDatasets,
    ) -> DiffResult:
        """Files added, removed and changed from ``old`` to ``new``."""
        for ref in (old, new):
            who.require(Action.READ_DATASETS, parse_ref(ref).dataset)
        return service.diff(old, new)

    @router.put("/labels")
    def set_label(body: LabelRequest, who: WriteDatasets) -> VersionInfo:
        """Point a label at a version (moving it if it exists)."""
        who.require(Action.WRITE_DATASETS, parse_ref(body.ref).dataset)
        return service.set_label(body.ref, body.label)

    from datasync.api.staging_routes import staging_router  # stage requests
    from datasync.api.token_routes import token_router  # whoami, tokens
    from datasync.api.transfer_routes import transfer_router  # placements, sites

    api.include_router(router)
    api.include_router(transfer_router(application, API_PREFIX))
    api.include_router(staging_router(application, API_PREFIX))
    from datasync.api.ui import ops_router  # /metrics, /ui

    api.include_router(ops_router(application))
    api.include_router(token_router(application, API_PREFIX))
    return api


def site_directory(settings: Settings, path: str) -> str:
    """``path`` as ``SITE:path`` of the configured site that holds it.

    The API scans directories of configured sites only (a client must not make the server
    read ``/etc``): ``SITE:path`` is taken as is (its path part is checked, and a symlink
    out of the site root is refused when it is scanned), an absolute path must lie under a
    POSIX site's root, after symlinks are resolved."""
    if "\x00" in path:
        raise InvalidPath("the path holds a NUL character")
    if parse_source(settings, path, urls=False) is not None:
        return path
    found = site_for_source(settings, path) if os.path.isabs(path) else None
    if found is None or parse_url(settings.sites[found[0]].url).scheme != "file":
        sites = ", ".join(sorted(settings.sites)) or "none configured"
        raise UserError(
            f"{path!r} is not a directory of a configured site (sites: {sites}): the API "
            "registers SITE:path, or an absolute path under a POSIX site's root"
        )
    site, prefix = found
    return f"{site}:{prefix.rstrip('/')}"


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
