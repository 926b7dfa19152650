"""HTTP API (FastAPI) over the service layer; see ``datasync.api.app``."""

from __future__ import annotations

from datasync.api.app import API_PREFIX, create_app

__all__ = ["API_PREFIX", "create_app"]
