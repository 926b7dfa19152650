"""Bearer-token authentication for the HTTP API, and the permission each route declares.

Every route under ``/api/v1`` but ``/health`` declares the action it takes (the table in
``datasync.auth.roles``) with ``permit(action)``: as a parameter when the route checks a
dataset's namespace itself, ``who: ReadDatasets`` then ``who.require(action, dataset)``, or
in ``dependencies=[Depends(permit(action))]``. ``tests/integration/test_auth_matrix.py``
fails for a route that needs no token, or that its table of rights does not name.

* No ``Authorization: Bearer <token>`` header, or an unknown, revoked or expired token:
  401 with ``WWW-Authenticate: Bearer``. A valid token without the right: 403. Both carry
  ``{"error": ...}``; neither repeats the token.
* Public: ``GET /api/v1/health``, the OpenAPI document ``/api/v1/openapi.json`` and the
  docs pages ``/docs`` and ``/redoc`` (they describe the API, and hold no data).
* Protecting another route or a mounted app (``/metrics``, ``/ui``) on the app that
  ``create_app`` builds: ``dependencies=[Depends(permit(Action.READ_PLACEMENTS))]`` on its
  route or router. The dependency finds the token service in ``request.app.state.tokens``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from datasync.auth.roles import Action, Principal, Unauthorized
from datasync.auth.tokens import TokenService

__all__ = [
    "Authenticated",
    "ManageTokens",
    "Operate",
    "ReadDatasets",
    "ReadPlacements",
    "ReadSites",
    "Stage",
    "WriteDatasets",
    "WritePlacements",
    "api_routes",
    "authenticate",
    "permit",
    "requires_token",
]

_bearer = HTTPBearer(
    auto_error=False,
    description="An API token: `datasync token create NAME --role ROLE` prints one.",
)


def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller behind the request's bearer token, or ``Unauthorized``."""
    if credentials is None:
        raise Unauthorized("missing credentials: send 'Authorization: Bearer <token>'")
    tokens: TokenService = request.app.state.tokens
    return tokens.authenticate(credentials.credentials)


Authenticated = Annotated[Principal, Depends(authenticate)]


@functools.cache
def permit(action: Action) -> Callable[[Principal], Principal]:
    """The dependency that lets a request through if its token's role may take ``action``
    (one callable per action, so FastAPI runs it once per request)."""

    def dependency(principal: Authenticated) -> Principal:
        principal.require(action)
        return principal

    dependency.__name__ = f"permit_{action.name.lower()}"
    return dependency


def api_routes(app: FastAPI) -> list[APIRoute]:
    """Every ``APIRoute`` of ``app``, those of included routers too (recent FastAPI keeps
    an included router whole instead of copying its routes into ``app.routes``)."""
    found: list[APIRoute] = []
    pending: list[object] = list(app.routes)
    while pending:
        route = pending.pop(0)
        if isinstance(route, APIRoute):
            found.append(route)
        included = getattr(route, "original_router", None)
        if included is not None:
            pending.extend(included.routes)
    return found


def _dependency_calls(route: APIRoute) -> list[object]:
    calls: list[object] = []
    pending = list(route.dependant.dependencies)
    while pending:
        dep = pending.pop()
        calls.append(dep.call)
        pending.extend(dep.dependencies)
    return calls


def requires_token(route: APIRoute) -> bool:
    """Whether ``route`` authenticates its caller (``permit`` or ``Authenticated``)."""
    return authenticate in _dependency_calls(route)


ReadDatasets = Annotated[Principal, Depends(permit(Action.READ_DATASETS))]
WriteDatasets = Annotated[Principal, Depends(permit(Action.WRITE_DATASETS))]
ReadPlacements = Annotated[Principal, Depends(permit(Action.READ_PLACEMENTS))]
ReadSites = Annotated[Principal, Depends(permit(Action.READ_SITES))]
WritePlacements = Annotated[Principal, Depends(permit(Action.WRITE_PLACEMENTS))]
Stage = Annotated[Principal, Depends(permit(Action.STAGE))]
Operate = Annotated[Principal, Depends(permit(Action.OPERATE))]
ManageTokens = Annotated[Principal, Depends(permit(Action.MANAGE_TOKENS))]
