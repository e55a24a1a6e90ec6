"""An aiohttp application served over TLS from a thread of the test process.

The enrollment servers the tests need (EST, a PKCS#12 registration
service) run in-process so that a test can read what they received, while
``agentctl`` and ``mtls-agent`` run as subprocesses and reach them over
loopback. The server has its own event loop in a daemon thread, so tests
may be plain functions that block on subprocesses, or coroutines on
pytest's loop, alike.

Every TLS handshake is counted (``handshakes``), which is how a test proves
that a client reached the server and still sent nothing.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

START_TIMEOUT = 10.0


class HttpsServer:
    """``make_app()`` on ``https://localhost:PORT`` (127.0.0.1), with the given certificate."""

    def __init__(
        self,
        make_app: Callable[[], web.Application],
        cert_chain: Path,
        key: Path,
        *,
        client_ca: Path | None = None,
    ) -> None:
        """``client_ca``: ask every client for a certificate and verify it
        against this CA when one is sent (optional for the client)."""
        self.make_app = make_app
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_chain, key)
        if client_ca is not None:
            self.context.verify_mode = ssl.CERT_OPTIONAL
            self.context.load_verify_locations(client_ca)
        self.context.sni_callback = self._count_handshake
        self.handshakes = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    def _count_handshake(self, *_: object) -> None:
        self.handshakes += 1

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.port}"

    def start(self) -> HttpsServer:
        """Serve (again, on the same port after ``stop``); return once listening."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False)
                loop.run_until_complete(self._runner.setup())
                site = web.SockSite(self._runner, sock, ssl_context=self.context)
                loop.run_until_complete(site.start())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="https-server", daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT) or failure:
            raise RuntimeError(f"the test HTTPS server did not start: {failure}")
        return self

    def stop(self) -> None:
        """Stop listening: clients are refused until ``start`` again."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(START_TIMEOUT)
        self._loop = self._thread = None

    def __enter__(self) -> HttpsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
