"""Who may do what: roles and actions (``roles``), API tokens (``tokens``).

The HTTP API applies them (``datasync.api.auth``); the local CLI does not go through them:
whoever can run ``datasync`` with the database's settings is trusted like ``admin``.
"""

from __future__ import annotations

from datasync.auth.roles import (
    ROLE_ACTIONS,
    Action,
    Forbidden,
    Principal,
    Role,
    Unauthorized,
    namespace_of,
)
from datasync.auth.tokens import (
    ADMIN_TOKEN_FILE,
    IssuedToken,
    TokenInfo,
    TokenService,
    read_token_file,
)

__all__ = [
    "ADMIN_TOKEN_FILE",
    "ROLE_ACTIONS",
    "Action",
    "Forbidden",
    "IssuedToken",
    "Principal",
    "Role",
    "TokenInfo",
    "TokenService",
    "Unauthorized",
    "namespace_of",
    "read_token_file",
]
