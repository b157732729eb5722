"""``streamgate-sim``: run the simulator until SIGINT or SIGTERM (see the package docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import resource
import signal
import sys
from collections.abc import Sequence

from streamgate.simulator.config import SimConfig, parse_config
from streamgate.simulator.http_server import bound_port, start_server, stop_server


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one: each stream is one socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
    return soft


async def serve(config: SimConfig) -> None:
    server, sim = await start_server(config)
    # Everything made so far (token tables, modules) lives as long as the process: keep it out
    # of the collector's scans so full collections stay short while thousands of streams run.
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    host = config.host if ":" not in config.host else f"[{config.host}]"
    print(f"streamgate-sim listening on http://{host}:{bound_port(server)}", flush=True)
    await stop.wait()
    await stop_server(server, sim)


def _loop_factory():  # uvloop when present (it comes with uvicorn[standard]), else asyncio's
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    raise_fd_limit()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        try:
            runner.run(serve(config))
        except OSError as error:  # the address is taken or not ours: say so, no traceback
            print(
                f"streamgate-sim: cannot listen on {config.host}:{config.port}: {error}",
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
