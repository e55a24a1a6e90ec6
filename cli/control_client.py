"""Talk to the running agent: JSON over HTTP/1.1 on the control socket.

Standard library only (``http.client`` over an ``AF_UNIX`` socket), so that
``agentctl`` starts fast and never imports the agent's server stack. Every
failure becomes an ``AgentError`` with one sentence: no agent listening is
``AgentNotRunning``; an error the agent answers is ``ControlError`` carrying
its wire code, so callers can react to ``bad-passphrase`` and the like.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
from pathlib import Path
from typing import Any

from agent.errors import AgentError, AgentNotRunning
from agent.peer import peer_of

#: Most calls answer at once; unlock runs a KDF and may be throttled up to 10 s.
DEFAULT_TIMEOUT = 30.0
UNLOCK_TIMEOUT = 120.0

_NOT_LISTENING = (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK)


class ControlError(AgentError):
    """The agent answered a control request with an error."""

    def __init__(self, message: str, code: str, status: int) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    """An HTTP connection whose transport is a Unix socket at ``path``."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self._path))
            _refuse_foreign_agent(sock, self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _refuse_foreign_agent(sock: socket.socket, path: Path) -> None:
    """Talk only to an agent of our own uid: a passphrase must not reach another
    user's process that took the socket's place."""
    peer = peer_of(sock)
    if peer is None or peer.uid != os.getuid():
        owner = "an unknown user" if peer is None else f"uid {peer.uid}"
        raise AgentError(
            f"the process on {path} belongs to {owner}, not to you; refusing to use it."
        )


class ControlClient:
    """One agent's control socket; each call is one short connection."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def not_running(self) -> AgentNotRunning:
        """The error for "nothing listens here", naming the socket we tried."""
        return AgentNotRunning(
            f"no agent is running on {self.path}; start one with 'mtls-agent', or in the"
            " background with 'eval \"$(agentctl start)\"'."
        )

    def get(self, path: str, *, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        return self._call("GET", path, None, timeout)

    def post(
        self, path: str, body: dict[str, Any] | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> dict[str, Any]:
        return self._call("POST", path, {} if body is None else body, timeout)

    def _call(
        self, method: str, path: str, body: dict[str, Any] | None, timeout: float
    ) -> dict[str, Any]:
        conn = _UnixConnection(self.path, timeout)
        try:
            headers = {"Accept": "application/json"}
            data = None
            if body is not None:
                data = json.dumps(body).encode("utf-8")
                headers["Content-Type"] = "application/json"
            try:
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except TimeoutError:
                raise AgentError(
                    f"the agent on {self.path} did not answer within {timeout:g} seconds."
                ) from None
            except OSError as exc:
                raise self._connection_error(exc) from None
            except http.client.HTTPException:
                raise AgentError(
                    f"the agent on {self.path} answered something that is not HTTP."
                ) from None
        finally:
            conn.close()
        return self._decode(response.status, raw)

    def _connection_error(self, exc: OSError) -> AgentError:
        if exc.errno in _NOT_LISTENING:
            return self.not_running()
        if isinstance(exc, ConnectionError):
            return AgentError(f"the agent on {self.path} closed the connection without answering.")
        reason = (exc.strerror or str(exc)).lower()
        return AgentError(f"cannot reach the agent on {self.path}: {reason}.")

    def _decode(self, status: int, raw: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise AgentError(
                f"the agent on {self.path} answered HTTP {status} without a JSON object."
            )
        if status >= 400:
            message = doc.get("message")
            code = doc.get("error")
            raise ControlError(
                message if isinstance(message, str) and message else f"HTTP {status}",
                code if isinstance(code, str) else "unknown",
                status,
            )
        return doc
