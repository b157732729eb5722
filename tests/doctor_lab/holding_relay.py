"""A TCP relay that buffers what the server sends: the layer the doctor must find.

    python3 holding_relay.py LISTEN_HOST:PORT TARGET_HOST:PORT [--quiet-ms 300]

Client to server bytes pass at once. Server to client bytes are held until the server has been
quiet for --quiet-ms (or 1 MiB is held, or it closes): a stream arrives in one piece at its end,
as behind a proxy that collects a response before sending it. It knows nothing of HTTP or TLS,
so it sits in front of a gateway's plain HTTP or an edge's HTTPS alike. Standard library only
(it runs on lab hosts with their system Python).
"""

from __future__ import annotations

import argparse
import asyncio

MAX_HELD_BYTES = 1 << 20


def host_port(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


async def pass_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()


async def hold_then_pass_on(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, quiet_s: float
) -> None:
    held = bytearray()
    while True:
        try:
            data = await asyncio.wait_for(reader.read(65536), quiet_s if held else None)
        except TimeoutError:
            data = None  # quiet long enough: let it go
        if data:
            held += data
            if len(held) < MAX_HELD_BYTES:
                continue
        if held:
            writer.write(bytes(held))
            held.clear()
            await writer.drain()
        if data == b"":
            writer.close()
            return


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("listen", type=host_port)
    parser.add_argument("target", type=host_port)
    parser.add_argument("--quiet-ms", type=float, default=300)
    args = parser.parse_args()

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter):
        try:
            server_reader, server_writer = await asyncio.open_connection(*args.target)
        except OSError:
            client_writer.close()
            return
        tasks = [
            asyncio.ensure_future(pass_on(client_reader, server_writer)),
            asyncio.ensure_future(
                hold_then_pass_on(server_reader, client_writer, args.quiet_ms / 1000)
            ),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            client_writer.close()
            server_writer.close()

    server = await asyncio.start_server(relay, *args.listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
