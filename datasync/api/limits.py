"""Request-size limits: an ASGI middleware that refuses bodies over a route's limit (413).

Every request body is counted as it arrives, whatever the client declared: a
``Content-Length`` over the limit is refused before a byte is read, and a body streamed
without one (chunked) is cut off at the limit. JSON routes share ``BodyLimits.json_bytes``;
upload routes (a producer manifest: streamed to a spool file, never held in memory) have
their own, larger ``upload_bytes``. The refusal is ``{"error": ...}`` like every API error.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from datasync.textfmt import human_bytes

__all__ = ["BodyLimits", "LimitBodies"]

MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class BodyLimits:
    json_bytes: int = MIB  # any route but uploads
    upload_bytes: int = 8 << 30  # a manifest of ~60 million entries


def too_large(limit: int) -> str:
    return f"request body is larger than this route's limit of {human_bytes(limit)}"


class LimitBodies:
    """ASGI middleware: ``uploads`` are ``(METHOD, path regex)`` pairs that get the upload
    limit; every other request gets the JSON limit."""

    def __init__(
        self, app: ASGIApp, limits: BodyLimits, uploads: Sequence[tuple[str, str]] = ()
    ) -> None:
        self.app = app
        self.limits = limits
        self.uploads = [(method, re.compile(pattern)) for method, pattern in uploads]

    def limit_for(self, method: str, path: str) -> int:
        for wanted, pattern in self.uploads:
            if method == wanted and pattern.fullmatch(path):
                return self.limits.upload_bytes
        return self.limits.json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await JSONResponse({"error": too_large(limit)}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the route that reads the body: the app's handler for
                    # HTTPException answers it (FastAPI re-raises HTTPException from reads).
                    raise HTTPException(413, too_large(limit))
            return message

        await self.app(scope, counted, send)
