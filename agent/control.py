"""The control plane: a small JSON API on the control socket for agentctl.

Kept apart from the proxy socket so that the proxy socket can be handed to a
sandbox without the power to unlock or change identities. Only the agent's
own uid may call it, whatever the config says. Every error has the same JSON
shape as the proxy's: ``{"error": code, "message": sentence}``.

    GET  /v1/status       state, counts, uptime, sockets
    GET  /v1/identities   which identities are loaded, which are broken
    POST /v1/unlock       {"passphrase": str, "timeout": seconds (optional; 0: no limit)}
    POST /v1/lock
    POST /v1/reload       re-read the vault (after import or removal)
    POST /v1/renew/NAME   renew an EST identity now; answers its new summary
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agent import __version__
from agent.audit import AuditLog
from agent.autolock import AutoLock
from agent.errors import AgentError, BadPassphrase, Locked
from agent.forward import ProxyServer
from agent.keychain import Keychain
from agent.paths import Paths
from agent.peer import caller_of
from agent.renewal import Renewer, renewable

log = logging.getLogger(__name__)



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
    renewer: Renewer | None = None
    audit: AuditLog | None = None
    autolock: AutoLock | None = None
    #: The service manager that passed the sockets ("systemd", "launchd"), if any.
    manager: str | None = None


class UnlockThrottle:
    """Failed unlocks are answered after a delay that doubles, up to a cap
    (0.1 s to 10 s by default, as ssh-agent does).

    Attempts are taken one at a time, so clients that retry in parallel wait
    their turn and the delay cannot be dodged by asking from several places.
    """

    def __init__(self, first: float = 0.1, maximum: float = 10.0) -> None:
        self._lock = asyncio.Lock()
        self._first = first
        self._maximum = maximum
        self._failures = 0

    def delay(self, failures: int) -> float:
        """The wait after the ``failures``-th wrong passphrase in a row."""
        return min(self._first * 2 ** min(failures - 1, 64), self._maximum)

    async def attempt(
        self,
        unlock: Callable[[], Awaitable[Any]],
        failed: Callable[[int, float], None] | None = None,
    ) -> Any:
        """Run ``unlock``; on a wrong passphrase tell ``failed`` (failures in a
        row, delay), wait the delay, and raise."""
        async with self._lock:
            try:
                result = await unlock()
            except BadPassphrase:
                self._failures += 1
                delay = self.delay(self._failures)
                log.warning("failed unlock (%d in a row)", self._failures)
                if failed is not None:
                    failed(self._failures, delay)
                await asyncio.sleep(delay)
                raise
            self._failures = 0
            return result


@web.middleware
async def _errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    caller = caller_of(request.transport.get_extra_info("socket")) if request.transport else None
    if caller is None or caller.uid != os.getuid():
        return _error(403, "peer-denied", "Only the agent's own user may use the control socket.")
    request["caller"] = caller
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
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the stack
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
        "renewal": _renewal(state),
        "autolock": state.autolock.describe() if state.autolock is not None else None,
        "service_manager": state.manager,
    }


def _renewal(state: ControlState) -> dict[str, Any]:
    """Each EST identity's renewal: next time, failures, last error."""
    return state.renewer.report() if state.renewer is not None else {}


def make_app(
    state: ControlState,
    max_body: int,
    *,
    unlock_delay: float = 0.1,
    unlock_delay_max: float = 10.0,
) -> web.Application:
    """The aiohttp application served on the control socket."""
    throttle = UnlockThrottle(unlock_delay, unlock_delay_max)
    keychain = state.keychain
    audit = state.audit

    async def status(_: web.Request) -> web.Response:
        return web.json_response(_status(state))

    async def identities(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "loaded": sorted(i.name for i in keychain.identities if keychain.is_loaded(i.name)),
                "broken": keychain.broken,
                "renewal": _renewal(state),
            }
        )

    async def unlock(request: web.Request) -> web.Response:
        body = await _json_object(request)
        passphrase = body.get("passphrase")
        if not isinstance(passphrase, str) or not passphrase:
            raise ApiError(400, "bad-request", "'passphrase' must be a non-empty string.")
        if not passphrase.isascii():
            try:  # a lone surrogate ("\ud800") is valid JSON but no UTF-8 the KDF can take
                passphrase.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, "bad-request", "'passphrase' is not valid Unicode.") from None
        timeout = body.get("timeout")
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or timeout < 0
        ):
            raise ApiError(400, "bad-request", "'timeout' must be a number of seconds, 0 or more.")
        caller = request["caller"]

        def failed(failures: int, delay: float) -> None:
            if audit is not None:
                audit.event("unlock-failed", caller, failures=failures, delay=delay)

        try:
            report = await throttle.attempt(lambda: keychain.unlock(passphrase, timeout), failed)
        except BadPassphrase as exc:
            raise ApiError(401, "bad-passphrase", exc.message) from None
        except AgentError as exc:
            raise ApiError(409, "vault-error", exc.message) from None
        for name, reason in report.broken.items():
            log.warning("identity %s could not be loaded: %s", name, reason)
        count = len(report.loaded)
        log.info("unlocked: %d %s loaded", count, "identity" if count == 1 else "identities")
        if audit is not None:
            audit.event("unlock", caller, loaded=report.loaded, broken=sorted(report.broken))
        if state.renewer is not None:
            state.renewer.wake()  # renewals that waited for the key run now
        return web.json_response({"loaded": report.loaded, "broken": report.broken})

    async def lock(request: web.Request) -> web.Response:
        keychain.lock()
        log.info("locked")
        if audit is not None:
            audit.event("lock", request["caller"], reason="agentctl")
        return web.json_response({"state": "locked"})

    async def reload(_: web.Request) -> web.Response:
        try:
            await keychain.reload()
        except AgentError as exc:
            raise ApiError(409, "vault-error", exc.message) from None
        if state.renewer is not None:
            state.renewer.wake()
        return web.json_response(_status(state))

    async def renew(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        identity = next((i for i in keychain.identities if i.name == name), None)
        if identity is None or state.renewer is None:
            raise ApiError(404, "unknown-identity", f"There is no identity named '{name}'.")
        if not renewable(identity):
            raise ApiError(
                409,
                "not-renewable",
                f"Identity '{name}' did not come from EST, so the agent cannot renew it; "
                "enroll or import a new one with --replace.",
            )
        try:
            renewed = await state.renewer.renew_now(name, request["caller"])
        except Locked as exc:
            raise ApiError(423, "locked", exc.message) from None
        except AgentError as exc:
            raise ApiError(502, "renewal-failed", exc.message) from None
        # the fields 'agentctl list --json' gives an identity, so scripts read both alike
        report = state.renewer.report().get(name, {})
        return web.json_response(
            {
                **renewed.summary(),
                "source_url": renewed.source.get("url"),
                "next_renewal": report.get("next_renewal"),
                "loaded": keychain.is_loaded(name),
            }
        )

    app = web.Application(middlewares=[_errors_as_json], client_max_size=max_body)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/identities", identities)
    app.router.add_post("/v1/unlock", unlock)
    app.router.add_post("/v1/lock", lock)
    app.router.add_post("/v1/reload", reload)
    app.router.add_post("/v1/renew/{name}", renew)
    return app
