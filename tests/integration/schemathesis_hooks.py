"""Loaded by schemathesis (``SCHEMATHESIS_HOOKS``) in ``test_schemathesis.py``: the manifest
upload's JSON Lines body is sent as the text schemathesis generates for it."""

from __future__ import annotations

import schemathesis

schemathesis.serializer.alias("application/x-ndjson", "text/plain")
