"""The origin and every peer the agent is measured against, configured alike.

Everything listens on loopback or on Unix sockets in the run's temporary
folder. The origin is Debian's nginx: TLS 1.3 only, ``ssl_verify_client
on``, a 100-byte ``/small``, a 1 GiB ``/big`` (a sparse file: no disk is
read), and ``/upload``, which streams a POST body to a small sink that
counts it (nginx alone cannot take a body without storing or discarding it
early). The same nginx serves the floor: ``/small`` as plain HTTP on a Unix
socket.

Every forwarder listens on a Unix socket, presents the same client chain,
verifies the origin against the same root, and keeps upstream connections
alive: nginx (``proxy_ssl_certificate``, upstream ``keepalive``), HAProxy
(``ssl crt``, ``http-reuse always``), stunnel (client mode; one upstream
connection per client connection, as it works), and the agent, driven as a
user drives it (``agentctl init``, ``import``, ``unlock``; ``mtls-agent``).
Each runs one process or one worker, so that none gets more cores than the
agent's single event loop.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.pki import BenchPki
from bench.procs import (
    BenchError,
    Service,
    children_of,
    find_tool,
    free_port,
    tcp_accepts,
    unix_accepts,
)

START_TIMEOUT = 20.0
BIG_SIZE = 1 << 30
SMALL_BODY = ("mtls-agent bench small answer " * 4)[:99] + "\n"
PASSPHRASE = "bench vault passphrase"
CLI_TIMEOUT = 600.0

#: Forwarders in the order of round one; later rounds rotate it.
FORWARDERS = ("nginx", "haproxy", "stunnel", "agent")


def _nginx_user() -> str:
    return "user root root;" if os.geteuid() == 0 else "# workers keep our user"


def _nginx_common(folder: Path) -> str:
    """The part of every nginx config that only says where things go."""
    return f"""\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 65536;
{_nginx_user()}
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 16384; }}
"""


def _temp_paths(folder: Path) -> str:
    return "\n".join(
        f"    {kind}_temp_path {folder}/tmp/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


class Sink(Service):
    """Counts a POST body on a Unix socket and answers with the count (bench.sink)."""

    def __init__(self, folder: Path) -> None:
        super().__init__("sink", folder)
        self.socket = folder / "sink.sock"

    def start(self) -> None:
        self.spawn([sys.executable, "-m", "bench.sink", str(self.socket)], env=_python_env())
        self.wait_ready(lambda: unix_accepts(self.socket), START_TIMEOUT)


def _python_env() -> dict[str, str]:
    """This interpreter's environment, with the project importable."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


class Origin(Service):
    """The mTLS origin (and the floor server); see the module doc."""

    def __init__(self, folder: Path, pki: BenchPki, sink: Sink, big_size: int = BIG_SIZE) -> None:
        super().__init__("origin", folder)
        self.pki = pki
        self.big_size = big_size
        self.sink = sink
        self.port = 0
        self.floor_socket = folder / "floor.sock"
        self.big_file = folder / "big.bin"
        self._workers: list[int] = []

    @property
    def host(self) -> str:
        """The Host a client sends: what the agent routes on."""
        return f"localhost:{self.port}"

    def url(self, path: str) -> str:
        return f"https://localhost:{self.port}{path}"

    def plain_url(self, path: str) -> str:
        """The URL a client of a forwarder asks for (plain HTTP, same Host)."""
        return f"http://localhost:{self.port}{path}"

    def _config(self) -> str:
        f, p = self.folder, self.pki
        return f"""{_nginx_common(f)}
http {{
    access_log off;
    default_type application/octet-stream;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
    output_buffers 2 256k;
{_temp_paths(f)}
    upstream sink {{
        server unix:{self.sink.socket};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{self.port} ssl backlog=4096;
        server_name localhost;
        ssl_certificate {p.server_cert};
        ssl_certificate_key {p.server_key};
        ssl_protocols TLSv1.3;
        ssl_verify_client on;
        ssl_client_certificate {p.root};
        ssl_verify_depth 2;
        location = /small {{
            default_type text/plain;
            return 200 "{SMALL_BODY[:-1]}\\n";
        }}
        location = /big {{
            alias {self.big_file};
        }}
        location = /upload {{
            client_max_body_size 0;
            proxy_request_buffering off;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://sink;
        }}
    }}
    server {{
        listen unix:{self.floor_socket} backlog=4096;
        location = /small {{
            default_type text/plain;
            return 200 "{SMALL_BODY[:-1]}\\n";
        }}
    }}
}}
"""

    def start(self) -> None:
        exe = find_tool("nginx")
        if exe is None:
            raise BenchError("nginx is not installed (Debian: nginx-light)")
        (self.folder / "tmp").mkdir(exist_ok=True)
        with open(self.big_file, "wb") as f:
            f.truncate(self.big_size)  # sparse: reads are zero pages, no disk
        self.port = free_port()
        conf = self.folder / "origin.conf"
        conf.write_text(self._config())
        self.spawn(
            [exe, "-p", str(self.folder), "-c", str(conf), "-e", str(self.folder / "error.log")]
        )
        self.wait_ready(
            lambda: tcp_accepts(self.port) and unix_accepts(self.floor_socket), START_TIMEOUT
        )
        self._workers = children_of(self.pid)

    def cpu_pids(self) -> list[int]:
        return self._workers


# --- forwarders ---------------------------------------------------------------


class Forwarder(Service):
    """A peer that takes plain HTTP on a Unix socket and speaks mTLS to the origin."""

    tool = ""

    def __init__(self, name: str, root: Path, origin: Origin) -> None:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        super().__init__(name, folder)
        self.origin = origin
        self.pki = origin.pki
        self.socket = folder / f"{name}.sock"

    @classmethod
    def installed(cls) -> bool:
        return find_tool(cls.tool) is not None

    def start(self) -> None:
        raise NotImplementedError

    def _wait_ready(self) -> None:
        self.wait_ready(lambda: unix_accepts(self.socket), START_TIMEOUT)


class NginxForwarder(Forwarder):
    tool = "nginx"

    def __init__(self, root: Path, origin: Origin) -> None:
        super().__init__("nginx", root, origin)
        self._workers: list[int] = []

    def _config(self) -> str:
        f, p = self.folder, self.pki
        return f"""{_nginx_common(f)}
http {{
    access_log {f}/access.log;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
{_temp_paths(f)}
    upstream origin {{
        server 127.0.0.1:{self.origin.port};
        keepalive 128;
        keepalive_requests 10000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen unix:{self.socket} backlog=4096;
        client_max_body_size 0;
        location / {{
            proxy_pass https://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_ssl_certificate {p.client_chain};
            proxy_ssl_certificate_key {p.client_key};
            proxy_ssl_trusted_certificate {p.root};
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_ssl_session_reuse on;
            proxy_request_buffering off;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""

    def start(self) -> None:
        (self.folder / "tmp").mkdir(exist_ok=True)
        conf = self.folder / "nginx.conf"
        conf.write_text(self._config())
        exe = find_tool("nginx")
        self.spawn(
            [exe, "-p", str(self.folder), "-c", str(conf), "-e", str(self.folder / "error.log")]
        )  # type: ignore[list-item]
        self._wait_ready()
        self._workers = children_of(self.pid)

    def cpu_pids(self) -> list[int]:
        return self._workers


class HAProxyForwarder(Forwarder):
    tool = "haproxy"

    def __init__(self, root: Path, origin: Origin) -> None:
        super().__init__("haproxy", root, origin)

    def _config(self) -> str:
        p = self.pki
        tls = (
            f"ssl crt {p.client_combined} ca-file {p.root} verify required verifyhost localhost "
            "sni str(localhost) alpn http/1.1"
        )
        return f"""\
global
    maxconn 8000
    nbthread 1
    log stdout format raw local0 info
defaults
    mode http
    log global
    option httplog
    option http-keep-alive
    http-reuse always
    maxconn 8000
    timeout connect 10s
    timeout client 75s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 75s
frontend local
    bind {self.socket} mode 600
    default_backend origin
backend origin
    server origin 127.0.0.1:{self.origin.port} {tls}
"""

    def start(self) -> None:
        conf = self.folder / "haproxy.cfg"
        conf.write_text(self._config())
        self.spawn([find_tool("haproxy"), "-db", "-f", str(conf)])  # type: ignore[list-item]
        self._wait_ready()


class StunnelForwarder(Forwarder):
    tool = "stunnel4"

    def __init__(self, root: Path, origin: Origin) -> None:
        super().__init__("stunnel", root, origin)

    @classmethod
    def installed(cls) -> bool:
        return cls._exe() is not None

    @staticmethod
    def _exe() -> str | None:
        return find_tool("stunnel4") or find_tool("stunnel")

    def _config(self) -> str:
        p = self.pki
        return f"""\
foreground = yes
pid =
output = {self.folder}/stunnel-output.log
socket = r:TCP_NODELAY=1
[origin]
client = yes
accept = {self.socket}
connect = 127.0.0.1:{self.origin.port}
cert = {p.client_chain}
key = {p.client_key}
CAfile = {p.root}
verifyChain = yes
checkHost = localhost
sni = localhost
sslVersionMin = TLSv1.2
"""

    def start(self) -> None:
        conf = self.folder / "stunnel.conf"
        conf.write_text(self._config())
        self.spawn([self._exe(), str(conf)])  # type: ignore[list-item]
        self._wait_ready()


# --- the agent ----------------------------------------------------------------

_ISOLATED_VARS = (
    "MTLS_AGENT_SOCK",
    "DBUS_SESSION_BUS_ADDRESS",
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)


def console_script(name: str) -> str:
    """The venv's console script ``name`` (beside this interpreter), else PATH's."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"{name} is not installed: pip install -e . first")
    return found


@dataclass
class CliTiming:
    """What an ``agentctl`` run printed, and how long it took."""

    seconds: float
    stdout: str


class AgentHome:
    """One user's world for the agent: XDG folders in a short temporary path."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mtb-"))
        env = {k: v for k, v in os.environ.items() if k not in _ISOLATED_VARS}
        folders = {
            var: self.root / sub
            for var, sub in (
                ("HOME", "home"),
                ("XDG_CONFIG_HOME", "config"),
                ("XDG_DATA_HOME", "data"),
                ("XDG_STATE_HOME", "state"),
                ("XDG_RUNTIME_DIR", "run"),
            )
        }
        for folder in folders.values():
            folder.mkdir(mode=0o700)
        env.update({k: str(v) for k, v in folders.items()})
        self.runtime_dir = folders["XDG_RUNTIME_DIR"] / "mtls-agent"
        self.vault_dir = folders["XDG_DATA_HOME"] / "mtls-agent" / "vault"
        self.socket = self.runtime_dir / "agent.sock"
        self.control_socket = self.runtime_dir / "control.sock"
        env["MTLS_AGENT_SOCK"] = str(self.socket)
        self.env = env
        self.passphrase_file = self.root / "passphrase"
        self.passphrase_file.touch(mode=0o600)
        self.passphrase_file.write_text(PASSPHRASE)

    def agentctl(self, *args: str | os.PathLike[str]) -> CliTiming:
        """Run ``agentctl ARGS``; a non-zero exit stops the run with its output."""
        cmd = [console_script("agentctl"), *map(os.fspath, args)]
        started = time.perf_counter()
        proc = subprocess.run(
            cmd,
            env=self.env,
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise BenchError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return CliTiming(seconds, proc.stdout)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class AgentForwarder(Forwarder):
    """``mtls-agent`` in its own home, with the bench identity imported and unlocked."""

    tool = "mtls-agent"

    def __init__(self, root: Path, origin: Origin, home: AgentHome | None = None) -> None:
        super().__init__("agent", root, origin)
        self.home = home or AgentHome()
        self.socket = self.home.socket

    @classmethod
    def installed(cls) -> bool:
        try:
            console_script("mtls-agent")
        except BenchError:
            return False
        return True

    def setup_vault(self, name: str = "origin") -> None:
        """``agentctl init``, and ``import`` of the client identity bound to localhost."""
        h, p = self.home, self.pki
        h.agentctl("init", "--passphrase-file", h.passphrase_file)
        h.agentctl(
            "import",
            name,
            p.client_p12,
            "--host",
            "localhost",
            "--ca",
            p.root,
            "--p12-password-file",
            p.p12_password_file,
        )

    def launch(self) -> None:
        """Start ``mtls-agent`` (locked) and wait for both sockets."""
        self.spawn([console_script("mtls-agent")], env=self.home.env)
        self.wait_ready(
            lambda: unix_accepts(self.home.control_socket) and unix_accepts(self.socket),
            START_TIMEOUT * 10,  # reading 10,000 identities' metadata takes a while
        )

    def unlock(self) -> CliTiming:
        return self.home.agentctl("unlock", "--passphrase-file", self.home.passphrase_file)

    def start(self) -> None:
        self.setup_vault()
        self.launch()
        self.unlock()


FORWARDER_CLASSES: dict[str, type[Forwarder]] = {
    "nginx": NginxForwarder,
    "haproxy": HAProxyForwarder,
    "stunnel": StunnelForwarder,
    "agent": AgentForwarder,
}
