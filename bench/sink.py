"""The origin's POST sink: reads a whole request body, answers with its size.

``python -m bench.sink SOCKET``. nginx proxies ``/upload`` here unbuffered,
so a 1 GiB POST is read to its last byte before the answer goes out (an
answer sent early would end the client's upload and measure nothing). It
counts and drops the bytes: nothing is stored.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import httptools


class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()  # type: ignore[union-attr]

    def on_message_begin(self) -> None:
        self.received = 0

    def on_body(self, body: bytes) -> None:
        self.received += len(body)

    def on_message_complete(self) -> None:
        text = f"received {self.received}\n".encode()
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
        self.transport.write(head % len(text) + text)  # type: ignore[union-attr]


async def _serve(path: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await loop.create_unix_server(_Sink, path)
    await stop.wait()
    server.close()
    os.unlink(path)


def main() -> None:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(_serve(sys.argv[1]))


if __name__ == "__main__":
    main()
