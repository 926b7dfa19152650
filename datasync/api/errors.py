"""How the HTTP API reports errors: ``{"error": "<message>"}`` with a status, documented.

``DatasyncError`` is mapped by class: ``Unauthorized`` 401 (with ``WWW-Authenticate:
Bearer``), ``Forbidden`` 403, ``UnknownReference`` 404, ``TokenExists`` 409, invalid content
(path, manifest, file type) 422, other ``UserError`` 400, anything else 500. A value the
database refuses to store or compare (PostgreSQL: a NUL character in text, a timestamp
past year 9999) is bad input too: 400 with the database's one-line reason, never the
statement or its parameters. Request validation is 422. Starlette's own errors keep their
status with the same body: an unknown route 404, a body over its limit 413, a method the
path does not serve 405 with an ``Allow`` header naming every method the path serves.
"""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.routing import Match

from datasync.api.auth import api_routes
from datasync.auth.roles import Forbidden, Unauthorized
from datasync.auth.tokens import TokenExists
from datasync.errors import (
    DatasyncError,
    InvalidManifest,
    InvalidPath,
    UnknownReference,
    UnsupportedFileType,
    UserError,
)

__all__ = [
    "AUTH_RESPONSES",
    "ERROR_RESPONSES",
    "ErrorBody",
    "error_response",
    "error_status",
    "install_error_handlers",
]


class ErrorBody(BaseModel):
    error: str


def error_response(description: str) -> dict[str, object]:
    """An OpenAPI ``responses`` entry with the error body."""
    return {"model": ErrorBody, "description": description}


# Documented on every route (the OpenAPI document is what clients and schemathesis check).
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    400: error_response("Bad input; nothing changed."),
    404: error_response("Unknown dataset, label, version or placement."),
    413: error_response("The request body is over the route's size limit."),
    422: error_response("Invalid manifest, path or request body."),
}
# And on every route that needs a token (all but /health).
AUTH_RESPONSES: dict[int | str, dict[str, object]] = {
    401: error_response("No token, or an unknown, revoked or expired one."),
    403: error_response("The token's role or namespaces do not allow this."),
}


def error_status(exc: DatasyncError) -> int:
    if isinstance(exc, Unauthorized):
        return 401
    if isinstance(exc, Forbidden):
        return 403
    if isinstance(exc, UnknownReference):
        return 404
    if isinstance(exc, TokenExists):
        return 409
    if isinstance(exc, InvalidManifest | InvalidPath | UnsupportedFileType):
        return 422
    if isinstance(exc, UserError):
        return 400
    return 500


def _methods_at(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in api_routes(request.app):
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)


def install_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(DatasyncError)
    async def _datasync_error(_request: Request, exc: DatasyncError) -> JSONResponse:
        status = error_status(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": exc.message}, status_code=status, headers=headers)

    @api.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route on the path only; a path
            # served by several routes (GET and POST /placements) serves all of theirs.
            headers["Allow"] = ", ".join(_methods_at(request))
        return JSONResponse(
            {"error": str(exc.detail)}, status_code=exc.status_code, headers=headers
        )

    @api.exception_handler(sa.exc.DataError)
    async def _data_error(_request: Request, exc: sa.exc.DataError) -> JSONResponse:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else "invalid value"
        return JSONResponse({"error": f"invalid value: {reason}"}, status_code=400)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}"
            for err in exc.errors()
        ]
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=422)
