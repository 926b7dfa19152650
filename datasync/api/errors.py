"""How the HTTP API reports errors: ``{"error": "<message>"}`` with a status, documented.

``DatasyncError`` is mapped by class: ``Unauthorized`` 401 (with ``WWW-Authenticate:
Bearer``), ``Forbidden`` 403, ``UnknownReference`` 404, invalid content (path, manifest, file
type) 422, other ``UserError`` 400, anything else 500. Request validation is 422, and
Starlette's own errors (unknown route 404, wrong method 405, a body over its limit 413)
keep their status with the same body.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from datasync.auth.roles import Forbidden, Unauthorized
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
    if isinstance(exc, InvalidManifest | InvalidPath | UnsupportedFileType):
        return 422
    if isinstance(exc, UserError):
        return 400
    return 500


def install_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(DatasyncError)
    async def _datasync_error(_request: Request, exc: DatasyncError) -> JSONResponse:
        status = error_status(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": exc.message}, status_code=status, headers=headers)

    @api.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}"
            for err in exc.errors()
        ]
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=422)
