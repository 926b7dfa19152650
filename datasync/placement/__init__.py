"""Placement: deadline scheduling, stage requests, policies, eviction and explain."""
