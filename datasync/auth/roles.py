"""Roles, the actions each may take, and the authenticated caller (``Principal``).

Pure: no database, no web framework. ``datasync.auth.tokens`` turns a bearer token into
a ``Principal``; the API asks it ``require(action, dataset)`` before doing anything.

=====================  =========  =====  =====  =====
action                 owner      hook   ops    admin
=====================  =========  =====  =====  =====
``datasets:read``      own ns     yes    yes    yes
``datasets:write``     own ns     -      -      yes
``placements:read``    own ns     yes    yes    yes
``sites:read``         -          yes    yes    yes
``placements:write``   -          -      -      yes
``stage:write``        -          yes    -      yes
``placements:operate`` -          -      yes    yes
``tokens:manage``      -          -      -      yes
=====================  =========  =====  =====  =====

An ``owner`` token names one or more namespaces (the first segment of a dataset name,
``drive`` in ``drive/tokyo-urban``) and its scoped actions apply to datasets in them only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from datasync.errors import DatasyncError, UserError

__all__ = [
    "ROLE_ACTIONS",
    "SCOPED_ACTIONS",
    "Action",
    "Forbidden",
    "Principal",
    "Role",
    "Unauthorized",
    "check_namespaces",
    "namespace_of",
]


class Unauthorized(DatasyncError):
    """No token, or one that is unknown, revoked or expired (HTTP 401)."""


class Forbidden(DatasyncError):
    """A valid token whose role or namespaces do not allow the action (HTTP 403)."""


class Role(StrEnum):
    OWNER = "owner"
    HOOK = "hook"
    OPS = "ops"
    ADMIN = "admin"


class Action(StrEnum):
    READ_DATASETS = "datasets:read"
    WRITE_DATASETS = "datasets:write"
    READ_PLACEMENTS = "placements:read"
    READ_SITES = "sites:read"
    WRITE_PLACEMENTS = "placements:write"
    STAGE = "stage:write"
    OPERATE = "placements:operate"
    MANAGE_TOKENS = "tokens:manage"
    OBSERVE = "dashboard:read"  # /ui/data: every placement, path and error message


ROLE_ACTIONS: dict[Role, frozenset[Action]] = {
    Role.OWNER: frozenset({Action.READ_DATASETS, Action.WRITE_DATASETS, Action.READ_PLACEMENTS}),
    Role.HOOK: frozenset(
        {Action.READ_DATASETS, Action.READ_PLACEMENTS, Action.READ_SITES, Action.STAGE}
    ),
    Role.OPS: frozenset(
        {
            Action.READ_DATASETS,
            Action.READ_PLACEMENTS,
            Action.READ_SITES,
            Action.OPERATE,
            Action.OBSERVE,
        }
    ),
    Role.ADMIN: frozenset(Action),
}
# Actions an owner may take only on datasets of its namespaces.
SCOPED_ACTIONS = frozenset({Action.READ_DATASETS, Action.WRITE_DATASETS, Action.READ_PLACEMENTS})

_NAMESPACE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def namespace_of(dataset: str) -> str:
    return dataset.split("/", 1)[0]


def check_namespaces(role: Role, namespaces: Iterable[str]) -> tuple[str, ...]:
    """Sorted, validated namespaces for a token of ``role``: owners need at least one,
    the other roles none."""
    found = tuple(sorted(set(namespaces)))
    for ns in found:
        if not _NAMESPACE_RE.fullmatch(ns):
            raise UserError(
                f"invalid namespace {ns!r}: the first segment of a dataset name "
                "(lowercase letters, digits, '.', '_' or '-', starting with a letter or digit)"
            )
    if role is Role.OWNER and not found:
        raise UserError("an owner token needs at least one namespace (--namespace drive)")
    if role is not Role.OWNER and found:
        raise UserError(f"namespaces apply to owner tokens only, not to role {role.value!r}")
    return found


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a token's name, role and (owners) namespaces. Never the token."""

    name: str
    role: Role
    namespaces: frozenset[str] = frozenset()

    def may(self, action: Action, dataset: str | None = None) -> bool:
        if action not in ROLE_ACTIONS[self.role]:
            return False
        if self.role is Role.OWNER and action in SCOPED_ACTIONS:
            # Scoped actions name a dataset; an owner's unscoped use (listing) is filtered.
            return dataset is None or namespace_of(dataset) in self.namespaces
        return True

    def require(self, action: Action, dataset: str | None = None) -> None:
        """Raise ``Forbidden`` unless this caller may take ``action`` (on ``dataset``)."""
        if self.may(action, dataset):
            return
        who = f"token {self.name!r} (role {self.role.value}"
        if self.namespaces:
            who += f" of {', '.join(sorted(self.namespaces))}"
        what = f"{action.value} on {dataset!r}" if dataset is not None else action.value
        raise Forbidden(f"{who}) is not allowed {what}")

    def sees(self, dataset: str) -> bool:
        """Whether a listing shows this caller ``dataset`` (owners: their namespaces)."""
        return self.role is not Role.OWNER or namespace_of(dataset) in self.namespaces
