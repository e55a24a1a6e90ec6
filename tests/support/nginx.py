"""A real nginx as the mTLS origin the agent talks to.

Each ``Nginx`` has its own prefix (config, pid, logs, temp folders, served
files) in a ``mkdtemp`` folder, listens on 127.0.0.1 (and on ::1 where the
machine has it) on a free port, and demands a client certificate that chains
to the given CA. It runs as root (workers stay root: ``user root;``) or as a
normal user alike.

The port is race-free under pytest-xdist: the test process binds port 0 and
listens, then hands the socket to nginx through nginx's own inherited-socket
mechanism (the ``NGINX`` environment variable, what its binary upgrade uses).
No other worker can take the port between choosing and binding it, and a
client may connect the moment ``start`` returns (the kernel queues it).

Locations:

- ``/echo`` and ``/echo/...``: ``200 ok``, with the client's certificate and the
  request echoed in headers: ``X-Client-S-DN``, ``X-Client-Serial``,
  ``X-Client-Verify``, ``X-Request-Method``, ``X-Request-Uri``, ``X-Host``, and
  ``X-Content-Length``, ``X-Transfer-Encoding``, ``X-Ssl-Protocol``,
  ``X-Connection``, ``X-Connection-Requests`` (nginx omits a header whose
  value is empty).
- ``/files/NAME``: static files from ``files_dir`` (see ``make_file``).
- ``/upload/NAME``: WebDAV ``PUT`` (and ``DELETE``; ``GET`` reads it back) into
  ``upload_dir``, any size, chunked or not.
- ``/cookies``: 200 with two separate ``Set-Cookie`` headers.
- ``/redirect``: 302 to ``/echo/redirected``.
- ``/status/NNN`` for NNN in ``STATUSES``: that status with body ``status NNN``.
- anything else: nginx's own 404.

The access log has one line per request, in this format (``LOG_FORMAT``)::

    $connection $connection_requests "$ssl_client_s_dn" $ssl_client_serial "$request"
    $status $request_length $bytes_sent $ssl_protocol

and ``access_log()`` parses it (see ``parse_access_line`` for the fields).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from support.pki import Pki
from support.tools import find_tool, sha256_file, write_deterministic_file

#: Statuses served at ``/status/NNN``.
STATUSES = (200, 201, 204, 400, 401, 403, 404, 500, 502, 503)

LOG_FORMAT = (
    "$connection $connection_requests "
    '"$ssl_client_s_dn" $ssl_client_serial "$request" '
    "$status $request_length $bytes_sent $ssl_protocol"
)

_LOG_LINE = re.compile(
    r'^(?P<connection>\d+) (?P<connection_requests>\d+) "(?P<client_s_dn>[^"]*)" '
    r'(?P<client_serial>\S+) "(?P<request>[^"]*)" (?P<status>\d+) '
    r"(?P<request_length>\d+) (?P<bytes_sent>\d+) (?P<ssl_protocol>\S+)$"
)

#: How long ``start`` waits for nginx to write its pid file.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.01


def _unescape(value: str) -> str:
    """Undo nginx's default log escaping (``"``, ``\\`` and non-ASCII as ``\\xHH``)."""
    if "\\x" not in value:
        return value
    raw = re.sub(rb"\\x([0-9A-Fa-f]{2})", lambda m: bytes([int(m[1], 16)]), value.encode("latin-1"))
    return raw.decode("utf-8", "replace")


def _dash_none(value: str) -> str | None:
    return None if value == "-" else value


def parse_access_line(line: str) -> dict[str, Any]:
    """One access-log line as a dict.

    Keys: ``connection`` (int, nginx's connection serial), ``connection_requests``
    (int, 1 for the first request on a connection), ``client_s_dn`` (str, RFC 2253
    like ``CN=mtls-agent test client,O=mtls-agent tests``, or None),
    ``client_serial`` (upper-case hex or None), ``request`` (the request line),
    ``method``, ``uri``, ``protocol`` (None when the request line did not parse),
    ``status``, ``request_length``, ``bytes_sent`` (ints), ``ssl_protocol``
    (``TLSv1.3``... or None).
    """
    m = _LOG_LINE.match(line.rstrip("\n"))
    if not m:
        raise ValueError(f"not an access-log line of LOG_FORMAT: {line!r}")
    request = _unescape(m["request"])
    parts = request.split(" ")
    method, uri, protocol = parts if len(parts) == 3 else (None, None, None)
    return {
        "connection": int(m["connection"]),
        "connection_requests": int(m["connection_requests"]),
        "client_s_dn": _dash_none(_unescape(m["client_s_dn"])),
        "client_serial": _dash_none(m["client_serial"]),
        "request": request,
        "method": method,
        "uri": uri,
        "protocol": protocol,
        "status": int(m["status"]),
        "request_length": int(m["request_length"]),
        "bytes_sent": int(m["bytes_sent"]),
        "ssl_protocol": _dash_none(m["ssl_protocol"]),
    }


def raise_nofile_limit() -> None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _listen_sockets() -> list[socket.socket]:
    """A listening 127.0.0.1 socket on a free port, plus ::1 on the same port if possible."""
    for _ in range(20):
        v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        v4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        v4.bind(("127.0.0.1", 0))
        v4.listen(1024)
        port = v4.getsockname()[1]
        try:
            v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        except OSError:
            return [v4]  # no IPv6 on this machine
        try:
            v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            v6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            v6.bind(("::1", port))
            v6.listen(1024)
            return [v4, v6]
        except OSError as exc:
            v6.close()
            if exc.errno == getattr(socket, "EADDRINUSE", 98):
                v4.close()
                continue  # that port is taken on ::1: pick another
            return [v4]  # ::1 is not configured
    raise RuntimeError("could not find a port free on both 127.0.0.1 and ::1")


class Nginx:
    """A real nginx serving HTTPS with client-certificate authentication (see module doc)."""

    def __init__(
        self,
        *,
        cert: Path,
        key: Path,
        client_ca: Path | None,
        verify_client: str = "on",
        name: str = "nginx",
    ) -> None:
        """``cert``/``key``: the server's (chain) PEM; ``client_ca``: what client certs must
        chain to; ``verify_client``: nginx's ``ssl_verify_client`` (on, optional, off)."""
        if verify_client != "off" and client_ca is None:
            raise ValueError("verify_client needs a client_ca")
        self.cert = Path(cert)
        self.key = Path(key)
        self.client_ca = Path(client_ca) if client_ca else None
        self.verify_client = verify_client
        self.name = name
        self.root = Path(tempfile.mkdtemp(prefix=f"mt-{name}-"))
        self.files_dir = self.root / "files"
        self.upload_dir = self.root / "upload"
        self.logs_dir = self.root / "logs"
        self.conf_path = self.root / "nginx.conf"
        self.pid_path = self.root / "nginx.pid"
        self.access_log_path = self.logs_dir / "access.log"
        self.error_log_path = self.logs_dir / "error.log"
        self.port = 0
        self.ipv6 = False
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def for_pki(cls, pki: Pki, *, untrusted: bool = False, verify_client: str = "on") -> Nginx:
        """An nginx trusting ``pki``'s root for clients, serving ``pki.server``'s certificate,
        or with ``untrusted=True`` the other root's (which no identity trusts)."""
        server = pki.other_server if untrusted else pki.server
        return cls(
            cert=server.chain_path or server.cert_path,
            key=server.key_path,
            client_ca=pki.root.cert_path if verify_client != "off" else None,
            verify_client=verify_client,
            name="nginx-untrusted" if untrusted else "nginx",
        )

    # --- addresses --------------------------------------------------------------

    @property
    def host_header(self) -> str:
        """``localhost:PORT``: the Host a client sends (and the agent routes on)."""
        return f"localhost:{self.port}"

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.port}"

    def url(self, path: str = "/") -> str:
        """``https://localhost:PORT`` + ``path``."""
        if not path.startswith("/"):
            path = "/" + path
        return self.base_url + path

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # --- life cycle -------------------------------------------------------------

    def _config(self) -> str:
        user = "user root root;" if os.geteuid() == 0 else "# not root: workers keep our user"
        listens = [f"listen 127.0.0.1:{self.port} ssl;"]
        if self.ipv6:
            listens.append(f"listen [::1]:{self.port} ssl;")
        tls_client = [f"ssl_verify_client {self.verify_client};"]
        if self.client_ca:
            tls_client += [f"ssl_client_certificate {self.client_ca};", "ssl_verify_depth 3;"]
        statuses = "\n".join(
            f'        location = /status/{code} {{ return {code} "status {code}\\n"; }}'
            for code in STATUSES
        )
        echo_headers = "\n".join(
            f"            add_header {name} {value} always;"
            for name, value in (
                ("X-Client-S-DN", '"$ssl_client_s_dn"'),
                ("X-Client-Serial", "$ssl_client_serial"),
                ("X-Client-Verify", "$ssl_client_verify"),
                ("X-Request-Method", "$request_method"),
                ("X-Request-Uri", '"$request_uri"'),
                ("X-Host", '"$http_host"'),
                ("X-Content-Length", "$http_content_length"),
                ("X-Transfer-Encoding", '"$http_transfer_encoding"'),
                ("X-Ssl-Protocol", "$ssl_protocol"),
                ("X-Connection", "$connection"),
                ("X-Connection-Requests", "$connection_requests"),
            )
        )
        r = self.root
        nl = "\n        "
        return f"""\
# written by tests/support/nginx.py
daemon off;
master_process on;
worker_processes 1;
{user}
pid {self.pid_path};
error_log {self.error_log_path} info;

events {{
    worker_connections 16384;
}}

http {{
    types {{
        text/plain txt;
        application/octet-stream bin;
    }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    server_tokens off;

    client_body_temp_path {r}/tmp/body;
    proxy_temp_path {r}/tmp/proxy;
    fastcgi_temp_path {r}/tmp/fastcgi;
    uwsgi_temp_path {r}/tmp/uwsgi;
    scgi_temp_path {r}/tmp/scgi;

    log_format mtls '{LOG_FORMAT}';
    access_log {self.access_log_path} mtls;

    keepalive_timeout 75s;
    keepalive_requests 10000;

    server {{
        {nl.join(listens)}
        server_name localhost;
        root {r}/html;

        ssl_certificate {self.cert};
        ssl_certificate_key {self.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        {nl.join(tls_client)}

        location /echo {{
            default_type text/plain;
{echo_headers}
            return 200 "ok\\n";
        }}

        location /files/ {{
            alias {self.files_dir}/;
        }}

        location /upload/ {{
            alias {self.upload_dir}/;
            dav_methods PUT DELETE;
            create_full_put_path on;
            dav_access user:rw;
            client_max_body_size 0;
        }}

        location = /cookies {{
            default_type text/plain;
            add_header Set-Cookie "first=1; Path=/" always;
            add_header Set-Cookie "second=2; Path=/; HttpOnly" always;
            return 200 "cookies\\n";
        }}

        location = /redirect {{
            return 302 /echo/redirected;
        }}

{statuses}
    }}
}}
"""

    def start(self) -> Nginx:
        """Start nginx; return once it has read its config and holds the port."""
        if self.proc is not None:
            raise RuntimeError("already started")
        exe = find_tool("nginx")
        if exe is None:
            raise FileNotFoundError("nginx is not installed")
        for sub in ("files", "upload", "logs", "html", "tmp"):
            (self.root / sub).mkdir(exist_ok=True)
        raise_nofile_limit()
        socks = _listen_sockets()
        try:
            self.port = socks[0].getsockname()[1]
            self.ipv6 = len(socks) > 1
            self.conf_path.write_text(self._config())
            fds = [s.fileno() for s in socks]
            env = {**os.environ, "NGINX": "".join(f"{fd};" for fd in fds)}
            with open(self.logs_dir / "stderr.log", "wb") as stderr:
                self.proc = subprocess.Popen(
                    [exe, "-p", str(self.root), "-c", str(self.conf_path),
                     "-e", str(self.error_log_path)],
                    env=env,
                    pass_fds=fds,
                    stdin=subprocess.DEVNULL,
                    stdout=stderr,
                    stderr=stderr,
                )  # fmt: skip
        finally:
            for s in socks:
                s.close()  # nginx holds its own copies now
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                log = self.logs_text()
                self.proc = None
                raise RuntimeError(f"nginx exited at start:\n{log}")
            if self._pid_file_is_ours():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nginx did not start in {START_TIMEOUT}s:\n{self.logs_text()}")
            time.sleep(POLL_INTERVAL)

    def _pid_file_is_ours(self) -> bool:
        try:
            return self.proc is not None and int(self.pid_path.read_text()) == self.proc.pid
        except (OSError, ValueError):
            return False

    def stop(self) -> int | None:
        """Fast shutdown (SIGTERM), SIGKILL after ``STOP_TIMEOUT``; return nginx's exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def cleanup(self) -> None:
        """Stop nginx and remove its folder."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # --- logs -------------------------------------------------------------------

    def logs_text(self) -> str:
        """nginx's error log and stderr, for failure messages."""
        out = []
        for path in (self.error_log_path, self.logs_dir / "stderr.log"):
            with contextlib.suppress(OSError):
                out.append(f"--- {path.name}\n{path.read_text(errors='replace')}")
        return "\n".join(out)

    def error_log(self) -> str:
        with contextlib.suppress(OSError):
            return self.error_log_path.read_text(errors="replace")
        return ""

    def mark(self) -> int:
        """A position in the access log: pass it as ``since`` to see only later requests.

        nginx is shared by the tests of a worker, so a test marks before it acts.
        """
        try:
            return self.access_log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _read_entries(self, since: int) -> list[dict[str, Any]]:
        try:
            with open(self.access_log_path, "rb") as f:
                f.seek(since)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]  # a line being written is not read yet
        return [
            parse_access_line(line)
            for line in complete.decode("utf-8", "replace").splitlines()
            if line
        ]

    def access_log(
        self, since: int = 0, *, wait_for: int = 0, timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """The parsed access-log entries after ``since`` (see ``parse_access_line``).

        nginx writes a line after the response has gone out, so a client can see
        its answer before the line exists: ``wait_for=N`` polls until at least N
        entries are there (fails with AssertionError after ``timeout``).
        """
        deadline = time.monotonic() + timeout
        while True:
            entries = self._read_entries(since)
            if len(entries) >= wait_for:
                return entries
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"nginx logged {len(entries)} requests, expected {wait_for}: {entries}"
                )
            time.sleep(POLL_INTERVAL)

    def connections(self, since: int = 0, *, wait_for: int = 0, timeout: float = 5.0) -> set[int]:
        """The ids of the connections that carried the requests after ``since``."""
        entries = self.access_log(since, wait_for=wait_for, timeout=timeout)
        return {e["connection"] for e in entries}

    # --- files ------------------------------------------------------------------

    def make_file(self, name: str, size: int, seed: str | None = None) -> tuple[Path, str]:
        """Create ``files/NAME`` (served at ``/files/NAME``) with ``size`` deterministic
        pseudo-random bytes (``support.tools.deterministic_chunks(seed or name, size)``);
        return its path and hex SHA-256. Streams: never holds the file in memory."""
        path = self.files_dir / name
        return path, write_deterministic_file(path, seed or name, size)

    def uploaded(self, name: str) -> Path:
        """Where a ``PUT /upload/NAME`` was stored."""
        return self.upload_dir / name

    def uploaded_sha256(self, name: str) -> str:
        """The hex SHA-256 of the file a ``PUT /upload/NAME`` stored."""
        return sha256_file(self.uploaded(name))
