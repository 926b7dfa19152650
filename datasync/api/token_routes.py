"""Token routes of the HTTP API: who am I, and token management (``admin`` only).

The same ``TokenService`` as ``datasync token create|list|revoke``. A created token is in
the response once; nothing can show it again.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, Field

from datasync.api.auth import Authenticated, ManageTokens
from datasync.api.errors import AUTH_RESPONSES, error_response
from datasync.api.params import NAMESPACE_PATTERN, TOKEN_NAME_PATTERN, documented
from datasync.auth.roles import Role
from datasync.auth.tokens import IssuedToken, TokenInfo, parse_expiry
from datasync.bootstrap import App

__all__ = ["TokenRequest", "WhoAmI", "token_router"]


class WhoAmI(BaseModel):
    name: str
    role: Role
    namespaces: list[str]


class TokenRequest(BaseModel):
    name: str = Field(
        description="A unique name: letters, digits, '.', '_' or '-'.",
        json_schema_extra=documented(TOKEN_NAME_PATTERN, "slurm-hook"),
    )
    role: Role
    namespaces: list[Annotated[str, Field(json_schema_extra=documented(NAMESPACE_PATTERN))]] = (
        Field(default_factory=list, description="Owner tokens: the namespaces they own.")
    )
    expires: str | None = Field(
        default=None, description="ISO 8601 time, or relative: +90s, +30m, +2h, +30d."
    )


def token_router(application: App, prefix: str = "/api/v1") -> APIRouter:
    tokens = application.tokens
    router = APIRouter(prefix=prefix, tags=["tokens"], responses=AUTH_RESPONSES)

    @router.get("/whoami")
    def whoami(who: Authenticated) -> WhoAmI:
        """The token's name, role and namespaces (any valid token)."""
        return WhoAmI(name=who.name, role=who.role, namespaces=sorted(who.namespaces))

    @router.get("/tokens")
    def list_tokens(_admin: ManageTokens) -> list[TokenInfo]:
        """Every token (never a token's value or hash)."""
        return tokens.list()

    @router.post(
        "/tokens",
        status_code=201,
        responses={409: error_response("A token of that name exists already.")},
    )
    def create_token(body: TokenRequest, _admin: ManageTokens) -> IssuedToken:
        """Issue a token; the response is the only place it is ever shown."""
        expires_at = parse_expiry(body.expires)
        return tokens.create(body.name, body.role, body.namespaces, expires_at=expires_at)

    @router.delete("/tokens/{name}")
    def revoke_token(name: str, _admin: ManageTokens) -> TokenInfo:
        """Revoke a token: it authenticates nobody from now on."""
        return tokens.revoke(name)

    return router
