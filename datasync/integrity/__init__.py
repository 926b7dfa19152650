"""Integrity: find damage at a site and have it repaired (``verify``: re-hash)."""
