"""A plain Python asyncio TCP relay (the "naive userspace proxy" baseline).

    python bench/asyncio_relay.py LISTEN_PORT UPSTREAM_PORT [UPSTREAM_HOST]

Each direction is a read(64 KiB) / write / drain loop on asyncio streams;
EOF on one side becomes write_eof() on the other; the connection closes
when both directions are done. Prints "READY <port>" once listening.
"""
from __future__ import annotations

import asyncio
import signal
import socket
import sys

CHUNK = 65536


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


async def main() -> None:
    listen_port = int(sys.argv[1])
    up_port = int(sys.argv[2])
    up_host = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(up_host, up_port)
        except OSError:
            cw.close()
            return
        for w in (cw, uw):
            s = w.get_extra_info("socket")
            if s is not None:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(pump(cr, uw), pump(ur, cw))
        for w in (cw, uw):
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port, reuse_address=True,
                                        backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {listen_port}", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
