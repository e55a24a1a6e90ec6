"""The control plane: a small JSON API on the control socket for agentctl.

Kept apart from the proxy socket so that the proxy socket can be handed to a
sandbox without the power to unlock or change identities. Only the agent's
own uid may call it, whatever the config says. Every error has the same JSON
shape as the proxy's: ``{"error": code, "message": sentence}``.

    GET  /v1/status       state, counts, uptime, sockets
    GET  /v1/identities   which identities are loaded, which are broken
    POST /v1/unlock       {"passphrase": str}
    POST /v1/lock
    POST /v1/reload       re-read the vault (after import or removal)
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agent import __version__
from agent.errors import AgentError, BadPassphrase
from agent.forward import ProxyServer
from agent.keychain import Keychain
from agent.paths import Paths
from agent.peer import peer_of

log = logging.getLogger(__name__)

_FIRST_DELAY = 0.1
_MAX_DELAY = 10.0


class ApiError(Exception):
    """An error answered to a control client."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


@dataclass
class ControlState:
    keychain: Keychain
    proxy: ProxyServer
    paths: Paths
    started: float


class UnlockThrottle:
    """Failed unlocks are answered after a delay that doubles, up to 10 s.

    Attempts are taken one at a time, so clients that retry in parallel wait
    their turn and the delay cannot be dodged by asking from several places.
    """

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._failures = 0

    async def attempt(self, unlock: Callable[[], Awaitable[Any]]) -> Any:
        async with self._lock:
            try:
                result = await unlock()
            except BadPassphrase:
                self._failures += 1
                delay = min(_FIRST_DELAY * 2 ** (self._failures - 1), _MAX_DELAY)
                log.warning("failed unlock (%d in a row)", self._failures)
                await asyncio.sleep(delay)
                raise
            self._failures = 0
            return result


@web.middleware
async def _errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    peer = peer_of(request.transport.get_extra_info("socket")) if request.transport else None
    if peer is None or peer.uid != os.getuid():
        return _error(403, "peer-denied", "Only the agent's own user may use the control socket.")
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc.status, exc.code, str(exc))
    except web.HTTPRequestEntityTooLarge:
        return _error(413, "too-large", "The request body is larger than the control limit.")
    except web.HTTPException as exc:
        return _error(exc.status, "bad-request", exc.reason)


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "bad-request", "The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad-request", "The body must be a JSON object.")
    return body


def _status(state: ControlState) -> dict[str, Any]:
    keychain = state.keychain
    return {
        "state": "locked" if keychain.locked else "unlocked",
        "identities": len(keychain.identities),
        "loaded": sum(1 for i in keychain.identities if keychain.is_loaded(i.name)),
        "broken": keychain.broken,
        "uptime_seconds": round(time.monotonic() - state.started, 3),
        "requests_served": state.proxy.requests_served,
        "upstream_connections_opened": state.proxy.pool.opened,
        "sockets": {
            "proxy": str(state.paths.proxy_socket),
            "control": str(state.paths.control_socket),
        },
        "pid": os.getpid(),
        "version": __version__,
    }


def make_app(state: ControlState, max_body: int) -> web.Application:
    """The aiohttp application served on the control socket."""
    throttle = UnlockThrottle()
    keychain = state.keychain

    async def status(_: web.Request) -> web.Response:
        return web.json_response(_status(state))

    async def identities(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "loaded": sorted(i.name for i in keychain.identities if keychain.is_loaded(i.name)),
                "broken": keychain.broken,
            }
        )

    async def unlock(request: web.Request) -> web.Response:
        body = await _json_object(request)
        passphrase = body.get("passphrase")
        if not isinstance(passphrase, str) or not passphrase:
            raise ApiError(400, "bad-request", "'passphrase' must be a non-empty string.")
        try:
            report = await throttle.attempt(lambda: keychain.unlock(passphrase))
        except BadPassphrase as exc:
            raise ApiError(401, "bad-passphrase", exc.message) from None
        except AgentError as exc:
            raise ApiError(409, "vault-error", exc.message) from None
        for name, reason in report.broken.items():
            log.warning("identity %s could not be loaded: %s", name, reason)
        log.info("unlocked: %d identities loaded", len(report.loaded))
        return web.json_response({"loaded": report.loaded, "broken": report.broken})

    async def lock(_: web.Request) -> web.Response:
        keychain.lock()
        log.info("locked")
        return web.json_response({"state": "locked"})

    async def reload(_: web.Request) -> web.Response:
        try:
            await keychain.reload()
        except AgentError as exc:
            raise ApiError(409, "vault-error", exc.message) from None
        return web.json_response(_status(state))

    app = web.Application(middlewares=[_errors_as_json], client_max_size=max_body)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/identities", identities)
    app.router.add_post("/v1/unlock", unlock)
    app.router.add_post("/v1/lock", lock)
    app.router.add_post("/v1/reload", reload)
    return app
