"""Fixtures the wire suites share: one test PKI, a gateway with client keys, the page's edge."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import ExitStack
from typing import NamedTuple

import pytest
from support import browser, services
from support.nginx import LocalNginx, require_nginx
from support.tls import LocalPKI, make_test_pki


@pytest.fixture(scope="session")
def pki() -> LocalPKI:
    """A test CA and the edges' server certificate (clients trust the CA, nothing else)."""
    return make_test_pki()


@pytest.fixture(scope="session")
def keyed_gateway_factory(
    gateway_factory, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., services.Service]:
    """start(upstream, {name: key}, workers=..., **settings) -> a gateway that takes only these
    client keys, read as deployed: their hashes in its env file."""

    def start(upstream, keys: dict[str, str], **settings) -> services.Service:
        env_file = tmp_path_factory.mktemp("keys") / "streamgate.env"
        env_file.write_text(services.client_keys_env_line(**keys))
        return gateway_factory(upstream, env_file=env_file, **settings)

    return start


class PageBackend(NamedTuple):
    simulator: services.Simulator
    gateway: services.Service


@pytest.fixture(scope="session")
def page_backend_factory(simulator_factory, keyed_gateway_factory) -> Callable[..., PageBackend]:
    """start(client_key, workers=...) -> the simulator and gateway behind the chat page: a
    simulator of the caller's own (its counters see only the caller's streams) at
    browser.PAGE_PACING, and a gateway that takes only `client_key` (as "web")."""

    def start(client_key: str, *, workers: int) -> PageBackend:
        simulator = simulator_factory(**browser.PAGE_PACING)
        gateway = keyed_gateway_factory(simulator, {"web": client_key}, workers=workers)
        return PageBackend(simulator, gateway)

    return start


@pytest.fixture(scope="session")
def page_edge_factory(running: ExitStack, pki: LocalPKI) -> Callable[..., LocalNginx]:
    """start(gateway, overrides=None, **options) -> the HTTPS edge in front of `gateway`,
    serving the chat page (web/, copied where nginx can read it) with the role's variables
    and `overrides` (e.g. nginx_cors_allowed_origins), LocalNginx `options` (buffering_fault)."""

    def start(gateway, overrides: dict | None = None, **options) -> LocalNginx:
        page_root = browser.copy_page()
        running.callback(shutil.rmtree, page_root, ignore_errors=True)
        proxy = LocalNginx(
            [f"{gateway.host}:{gateway.port}"],
            pki=pki,
            overrides={"__nginx_chat_page_root": str(page_root), **(overrides or {})},
            **options,
        )
        running.callback(proxy.stop)
        return proxy.start(require_nginx())

    return start
