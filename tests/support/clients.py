"""Clients of the proxy socket as users run them: real curl, and raw bytes.

``curl`` parses curl's ``-i`` output into status, repeated headers and body,
so tests assert on exactly what a user's curl received. ``raw_exchange``
sends bytes no HTTP library would let through (malformed heads).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from support.nginx import Nginx
from support.pki import Pki
from support.tools import require_tool


@dataclass
class CurlResult:
    returncode: int
    status: int | None
    headers: list[tuple[str, str]]
    body: bytes
    stderr: str

    def header(self, name: str) -> str | None:
        values = self.headers_named(name)
        return values[0] if values else None

    def headers_named(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> dict:
        return json.loads(self.body)


def _parse_heads(raw: bytes) -> tuple[int | None, list[tuple[str, str]], bytes]:
    """The final head (after any 1xx) and the body from ``curl -i`` output."""
    status: int | None = None
    headers: list[tuple[str, str]] = []
    rest = raw
    while rest.startswith(b"HTTP/"):
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = [tuple(s.strip() for s in line.split(":", 1)) for line in lines[1:]]  # type: ignore[misc]
        if not 100 <= status < 200:
            break
    return status, headers, rest


def curl(
    socket_path: Path | str,
    url: str,
    *args: str,
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> CurlResult:
    """Run real curl through the agent's Unix socket (``-sS -i``)."""
    exe = require_tool("curl")
    proc = subprocess.run(
        [exe, "-sS", "-i", "--unix-socket", os.fspath(socket_path), *args, url],
        capture_output=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    status, headers, body = _parse_heads(proc.stdout)
    return CurlResult(proc.returncode, status, headers, body, proc.stderr.decode(errors="replace"))


def raw_exchange(socket_path: Path | str, data: bytes, timeout: float = 15) -> bytes:
    """Send ``data`` on a fresh connection; everything read until the agent closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(socket_path))
        sock.sendall(data)
        chunks = []
        while True:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            chunks.append(piece)
    return b"".join(chunks)


def raw_status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def raw_body_json(response: bytes) -> dict:
    return json.loads(response.partition(b"\r\n\r\n")[2])


def direct_connection_id(pki: Pki, nginx: Nginx) -> int:
    """nginx's connection serial for a request curl makes itself (no agent): two of
    them around an agent request show whether the agent opened a connection."""
    out = subprocess.run(
        [require_tool("curl"), "-sS", "-D", "-", "-o", os.devnull, "--cacert", str(pki.root_pem),
         "--cert", str(pki.client.chain_path), "--key", str(pki.client.key_path),
         nginx.url("/echo")],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    for line in out.splitlines():
        if line.lower().startswith("x-connection:"):
            return int(line.split(":", 1)[1])
    raise AssertionError(f"no X-Connection in {out!r}")
