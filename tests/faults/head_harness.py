"""The real relay's request side, in this process, fed raw bytes: for fuzzing.

``HeadHarness`` runs the agent's own ``ProxyServer`` on a private uvloop
loop, with a keychain over an empty vault: every well-formed request is
answered by the agent itself (403 ``no-identity-for-host``), every malformed
one with 400/414/431, so no network is involved. Each input goes over a real
socketpair, is followed by the client's end of input (a half-close), and is
read back until the agent closes.

``check(data)`` raises ``HeadFault`` when the agent breaks a rule: an
exception escaped into the event loop, an answer is not a well-formed agent
error with its JSON body, or the connection was left open after the client
had finished. Both the hypothesis tests and the atheris target use it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
from pathlib import Path

import uvloop

from agent.audit import AuditLog
from agent.config import Limits
from agent.forward import ProxyServer
from agent.keychain import Keychain
from agent.vault import Vault

#: How long the agent may take to close after the client's half-close.
CLOSE_WITHIN = 1.0
AGENT_STATUSES = {400, 403, 414, 431}


class HeadFault(AssertionError):
    """The relay broke one of its rules on this input."""


class HeadHarness:
    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.escaped: list[dict] = []
        self.loop.set_exception_handler(lambda _loop, context: self.escaped.append(context))
        self._dir = tempfile.TemporaryDirectory(prefix="mt-fuzz-")
        folder = Path(self._dir.name)
        keychain = Keychain(Vault(folder / "vault"), folder)
        limits = Limits(head_timeout=5.0, keepalive_idle=5.0)
        # every answer, refusals included, writes its audit line as in the agent
        self.audit = AuditLog(folder / "audit.jsonl", max_bytes=1 << 20, keep=1)
        self.server = ProxyServer(keychain, limits, frozenset({os.getuid()}), self.audit)

    def close(self) -> None:
        self.server.close()
        self.audit.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()
        self._dir.cleanup()

    def run(self, data: bytes) -> bytes:
        """Everything the agent writes back for ``data`` before it closes."""
        return self.loop.run_until_complete(self._exchange(data))

    async def _exchange(self, data: bytes) -> bytes:
        ours, theirs = socket.socketpair()
        with ours:
            ours.setblocking(False)
            await self.loop.connect_accepted_socket(self.server, theirs)
            await self.loop.sock_sendall(ours, data)
            ours.shutdown(socket.SHUT_WR)
            chunks = []
            try:
                async with asyncio.timeout(CLOSE_WITHIN):
                    while piece := await self.loop.sock_recv(ours, 65536):
                        chunks.append(piece)
            except TimeoutError:
                raise HeadFault(
                    f"the agent left the connection open after the client finished; "
                    f"it wrote {b''.join(chunks)[:200]!r}"
                ) from None
            except ConnectionResetError:
                pass
        return b"".join(chunks)

    def check(self, data: bytes) -> list[int]:
        """Run ``data`` and check the answers; return their statuses."""
        out = self.run(data)
        if self.escaped:
            context = self.escaped.pop()
            self.escaped.clear()
            raise HeadFault(f"an exception escaped into the event loop: {context}")
        return check_answers(out)


def check_answers(out: bytes) -> list[int]:
    """Each answer must be the agent's own error: status, code header, JSON body."""
    statuses = []
    while out:
        head, sep, rest = out.partition(b"\r\n\r\n")
        if not sep:
            raise HeadFault(f"a truncated answer: {out[:200]!r}")
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or parts[0] != b"HTTP/1.1" or not parts[1].isdigit():
            raise HeadFault(f"not an HTTP/1.1 status line: {lines[0][:200]!r}")
        status = int(parts[1])
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise HeadFault(f"a malformed header line: {line[:200]!r}")
            headers[name.strip().lower()] = value.strip()
        if status not in AGENT_STATUSES:
            raise HeadFault(f"status {status} is none the agent answers here")
        length = int(headers.get(b"content-length", b"-1"))
        if length < 0 or len(rest) < length:
            raise HeadFault(f"an answer without its whole body: {out[:300]!r}")
        body, out = rest[:length], rest[length:]
        try:
            doc = json.loads(body)
        except ValueError:
            raise HeadFault(f"an error body that is not JSON: {body[:200]!r}") from None
        code = headers.get(b"mtls-agent-error", b"").decode()
        if doc.get("error") != code or not code or not doc.get("message"):
            raise HeadFault(f"an error without its code and message: {head!r} {body!r}")
        expected = "no-identity-for-host" if status == 403 else "bad-request"
        if code != expected:
            raise HeadFault(f"status {status} with code {code}")
        statuses.append(status)
    return statuses
