"""The simulator on its own event loop in a background thread, for in-process tests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

from streamgate.simulator.config import SimConfig
from streamgate.simulator.http_server import bound_port, start_server, stop_server
from streamgate.simulator.simulation import Simulator
from streamgate.simulator.stats import Stats


class SimulatorThread:
    """A simulator on its own event loop in a background thread, for in-process tests.

    ``with SimulatorThread(SimConfig(port=0)) as sim: httpx.get(sim.url + "/healthz")``;
    ``sim.stats`` is the live Stats object (read it, or call ``sim.call(fn)`` to run code on the
    simulator's loop).
    """

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.url = ""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.simulator: Simulator | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def stats(self) -> Stats:
        assert self.simulator is not None
        return self.simulator.stats

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            self._server, self.simulator = loop.run_until_complete(start_server(self.config))
            self.url = f"http://{self.config.host}:{bound_port(self._server)}"
        except BaseException as error:  # reported to the starting thread
            self._error = error
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(stop_server(self._server, self.simulator))
        loop.close()

    def start(self) -> SimulatorThread:
        self._thread = threading.Thread(target=self._run, name="streamgate-sim", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=10)
        if self._error is not None:
            raise self._error
        return self

    def call(self, function: Any, *args: Any) -> Any:
        """Run function(*args) on the simulator's loop and return its result."""
        assert self.loop is not None
        future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(function(*args))
            except BaseException as error:
                future.set_exception(error)

        self.loop.call_soon_threadsafe(run)
        return future.result(timeout=10)

    def stop(self) -> None:
        if self.loop is not None and self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> SimulatorThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
