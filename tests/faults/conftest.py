"""Fixtures of the fault suite: a fault proxy in front of a session emulator, and sites that
talk to the emulator through it.

``through_proxy(site, proxy)`` is the same site (same bucket or container) with its endpoint
pointed at the proxy; checks read the original ``site`` straight from the emulator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.faults.proxy import FaultProxy, Store
from tests.fixtures.replication import Site

_UPSTREAM_FIXTURE = {"s3": "moto_server", "azure": "azurite", "gcs": "gcs_emulator"}


def upstream_of(kind: str, request: pytest.FixtureRequest) -> str:
    value = request.getfixturevalue(_UPSTREAM_FIXTURE[kind])
    return value if isinstance(value, str) else str(value.endpoint)


def through_proxy(site: Site, proxy: FaultProxy) -> Site:
    """``site`` with its endpoint replaced by the proxy's."""
    opts = dict(site.config.options)
    if site.kind == "s3":
        opts["endpoint_url"] = proxy.url
    elif site.kind == "gcs":
        opts["endpoint"] = proxy.url
    elif site.kind == "azure":
        parts = [p for p in str(opts["connection_string"]).split(";") if p]
        parts = [p for p in parts if not p.startswith("BlobEndpoint=")]
        parts.append(f"BlobEndpoint={proxy.url}/devstoreaccount1")
        opts["connection_string"] = ";".join(parts) + ";"
    else:
        raise ValueError(f"no proxy for a {site.kind} site")
    return Site(site.name, site.config.model_copy(update={"options": opts}), site.kind, site.root)


@pytest.fixture
def fault_proxy(request: pytest.FixtureRequest) -> Iterator[Callable[[str], FaultProxy]]:
    """``fault_proxy(kind)``: a started proxy in front of the session's emulator of
    ``kind`` (s3, azure, gcs); stopped when the test ends."""
    started: list[FaultProxy] = []

    def make(kind: str) -> FaultProxy:
        store: Store = kind  # type: ignore[assignment]
        proxy = FaultProxy(upstream_of(kind, request), store).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()
