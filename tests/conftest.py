"""Shared fixtures: real processes on free loopback ports (simulator, gateway, local nginx).

Scopes: the default simulator, gateway and nginx live for the whole session (starting gunicorn
costs about a second); the factories start variants (short timeouts, slow first token, the
buffering fault) that the caller stops, and whatever is still running at the end of the session
is stopped then. On a failing test, the logs of every process it used are attached to the report.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from importlib.util import find_spec
from pathlib import Path

import pytest
from support import services
from support.ci import skip_unless_ci
from support.nginx import LocalNginx, require_nginx

# ansible-inventory and ansible-playbook (testinfra's backend, the doctor, the operations suite)
# are the ones next to this Python (the project venv), activated or not.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

# Wire tests start real processes: a default bound so a hang fails instead of blocking CI.
WIRE_TEST_TIMEOUT_S = 90


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "wire" in item.path.parts and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(WIRE_TEST_TIMEOUT_S))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed:
        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, services.Service):
                report.sections.append((f"process log: {name}", value.describe()))
            elif isinstance(value, LocalNginx) and value.workdir is not None:
                report.sections.append((f"nginx logs: {name}", value.logs()))
    return report


@pytest.fixture(scope="session")
def inventory(request: pytest.FixtureRequest) -> Path:
    """The deployment the lab suites act on (--ansible-inventory: the lab's, its CA and client
    key beside it); without one they skip, except under CI."""
    path = request.config.option.ansible_inventory
    if not path:
        skip_unless_ci("needs --ansible-inventory (the lab's)")
    return Path(path).resolve()


@pytest.fixture(scope="session")
def process_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("process-logs")


@pytest.fixture(scope="session")
def running(request: pytest.FixtureRequest) -> Iterator[ExitStack]:
    """Stops, at the end of the session, every process the factories started."""
    with ExitStack() as stack:
        yield stack


@pytest.fixture(scope="session")
def simulator_factory(process_logs: Path, running: ExitStack) -> Callable[..., services.Simulator]:
    """start(ttft_ms=..., gap_ms=..., tokens=..., stall_s=...) -> a running simulator."""

    def start(**options) -> services.Simulator:
        simulator = services.start_simulator(process_logs, **options)
        running.callback(simulator.stop)
        return simulator

    return start


@pytest.fixture(scope="session")
def gateway_factory(process_logs: Path, running: ExitStack) -> Callable[..., services.Service]:
    """start(upstream_simulator, workers=2, **settings) -> a gateway under real gunicorn."""

    def start(upstream: services.Simulator, **settings) -> services.Service:
        gateway = services.start_gateway(process_logs, upstream, **settings)
        running.callback(gateway.stop)
        return gateway

    return start


@pytest.fixture(scope="session")
def nginx_factory(running: ExitStack) -> Callable[..., LocalNginx]:
    """start(upstream_service, buffering_fault=False, **role_variables) -> a local nginx from
    nginx/*.j2 (role_variables override the role's, e.g. nginx_worker_shutdown_timeout="2s")."""

    def start(
        upstream: services.Service, *, buffering_fault: bool = False, **overrides
    ) -> LocalNginx:
        binary = require_nginx()
        proxy = LocalNginx(
            [f"{upstream.host}:{upstream.port}"],
            buffering_fault=buffering_fault,
            overrides=overrides,
        )
        running.callback(proxy.stop)
        return proxy.start(binary)

    return start


@pytest.fixture(scope="session")
def llama_factory(
    process_logs: Path, running: ExitStack, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., services.Service]:
    """start(size="tiny"|"paced", **server_options) -> llama.cpp's server on a generated model."""
    if find_spec("xllamacpp") is None:  # the service's llm extra, which make venv installs
        skip_unless_ci("xllamacpp not installed (make venv installs it)")
    models = tmp_path_factory.mktemp("llm-models")

    def start(size: str = "tiny", **options: int) -> services.Service:
        llama = services.start_llama(
            process_logs, services.make_test_model(models, size), **options
        )
        running.callback(llama.process.stop)
        return llama

    return start


@pytest.fixture(scope="session")
def simulator(simulator_factory) -> services.Simulator:
    """50 tokens, 20 ms apart, 50 ms to the first token, no jitter."""
    return simulator_factory()


@pytest.fixture(scope="session")
def gateway(gateway_factory, simulator) -> services.Service:
    """Two gunicorn workers with default settings, streaming from the default simulator."""
    return gateway_factory(simulator, workers=2)


@pytest.fixture(scope="session")
def nginx(nginx_factory, gateway) -> LocalNginx:
    """nginx rendered from the project's templates, in front of the default gateway."""
    return nginx_factory(gateway)
