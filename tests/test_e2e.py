"""The agent end to end, as a user drives it: agentctl, mtls-agent, curl, nginx.

nginx demands a client certificate and trusts only the root CA, while the
client leaf is issued by an intermediate: every 200 from /echo proves the
agent presented the identity *and* sent the intermediate in the handshake.
Assertions are on what nginx saw (its echo headers and access log), not only
on what the agent says.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from support.agent import AgentEnv, AgentProcess, start_agent, write_secret_file
from support.clients import (
    CurlResult,
    curl,
    direct_connection_id,
    raw_body_json,
    raw_exchange,
    raw_status,
)
from support.nginx import Nginx
from support.pki import P12_PASSWORD, Pki
from support.tools import require_tool

PASSPHRASE = "correct horse battery staple"


@dataclass
class Setup:
    env: AgentEnv
    agent: AgentProcess
    pki: Pki
    nginx: Nginx

    def get(self, path: str, *args: str, host: str | None = None) -> CurlResult:
        authority = host or self.nginx.host_header
        return curl(self.env.proxy_socket, f"http://{authority}{path}", *args)


def init_vault(env: AgentEnv) -> None:
    env.agentctl("init", "--passphrase-file", env.passphrase_file(PASSPHRASE))


def import_identity(
    env: AgentEnv, pki: Pki, name: str = "work", p12: Path | None = None, *hosts: str
) -> subprocess.CompletedProcess[str]:
    password = write_secret_file(env.root, P12_PASSWORD, f"{name}-p12-password")
    host_args = [f"--host={h}" for h in (hosts or ("localhost",))]
    return env.agentctl(
        "import", name, p12 or pki.client_p12("modern"), *host_args,
        "--ca", pki.root_pem, "--p12-password-file", password,
    )  # fmt: skip


def unlock(env: AgentEnv) -> None:
    env.agentctl("unlock", "--passphrase-file", env.passphrase_file(PASSPHRASE))


@pytest.fixture
def make_setup(agent_env: AgentEnv, pki: Pki, nginx: Nginx) -> Iterator[Callable[..., Setup]]:
    """Init a vault, import the client identity for localhost, start and unlock."""
    agents: list[AgentProcess] = []

    def make(config: str | None = None, *, unlocked: bool = True) -> Setup:
        if config:
            agent_env.write_config(config)
        init_vault(agent_env)
        import_identity(agent_env, pki)
        agent = start_agent(agent_env)
        agents.append(agent)
        if unlocked:
            unlock(agent_env)
        return Setup(agent_env, agent, pki, nginx)

    yield make
    for agent in agents:
        agent.stop()


@pytest.fixture
def setup(make_setup: Callable[..., Setup]) -> Setup:
    return make_setup()


def assert_agent_error(result: CurlResult, status: int, code: str) -> None:
    assert result.status == status, (result.status, result.body, result.stderr)
    assert result.header("Mtls-Agent-Error") == code
    body = result.json()
    assert body["error"] == code
    assert body["message"].endswith(".")


# --- forwarding ---------------------------------------------------------------


def test_curl_request_is_forwarded_with_the_identity_and_its_intermediate(setup: Setup) -> None:
    mark = setup.nginx.mark()
    result = setup.get("/echo/items?page=2")

    assert result.status == 200, result
    assert result.body == b"ok\n"
    assert result.header("X-Client-Verify") == "SUCCESS"
    assert result.header("X-Client-S-DN") == "CN=mtls-agent test client,O=mtls-agent tests"
    assert result.header("X-Client-Serial") == setup.pki.client.serial_hex.upper()
    assert result.header("X-Request-Uri") == "/echo/items?page=2"
    assert result.header("X-Ssl-Protocol") == "TLSv1.3"
    [entry] = setup.nginx.access_log(mark, wait_for=1)
    assert entry["client_s_dn"] == "CN=mtls-agent test client,O=mtls-agent tests"
    assert entry["status"] == 200


def test_absolute_form_request_goes_to_the_uri_host(setup: Setup) -> None:
    port = setup.nginx.port
    response = raw_exchange(
        setup.env.proxy_socket,
        f"GET http://localhost:{port}/echo HTTP/1.1\r\nHost: ignored.example\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert raw_status(response) == 200
    assert f"X-Host: localhost:{port}".encode() in response


async def test_python_client_through_the_unix_socket(setup: Setup) -> None:
    connector = aiohttp.UnixConnector(path=str(setup.env.proxy_socket))
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(3):
            url = f"http://{setup.nginx.host_header}/echo"
            async with session.get(url) as response:
                assert response.status == 200
                assert response.headers["X-Client-Verify"] == "SUCCESS"
                assert await response.text() == "ok\n"


def test_upstream_answers_reach_the_client_unchanged(setup: Setup) -> None:
    cookies = setup.get("/cookies")
    assert cookies.headers_named("Set-Cookie") == ["first=1; Path=/", "second=2; Path=/; HttpOnly"]

    redirect = setup.get("/redirect")  # never followed by the agent
    assert redirect.status == 302
    assert redirect.header("Location").endswith("/echo/redirected")
    assert redirect.header("Mtls-Agent-Error") is None

    missing = setup.get("/status/404")
    assert (missing.status, missing.body) == (404, b"status 404\n")
    assert missing.header("Mtls-Agent-Error") is None

    head = setup.get("/cookies", "-I")
    assert head.status == 200 and head.header("Content-Length") == "8" and head.body == b""


def test_http10_client_is_served(setup: Setup) -> None:
    result = setup.get("/echo", "--http1.0")
    assert result.status == 200
    assert result.header("X-Client-Verify") == "SUCCESS"


@pytest.mark.parametrize(
    "framing",
    [
        [],
        ["-H", "Transfer-Encoding: chunked"],
        ["-H", "Expect: 100-continue"],
    ],
    ids=["content-length", "chunked", "expect-100-continue"],
)
def test_request_bodies_reach_the_upstream_intact(setup: Setup, framing: list[str]) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    body = Path(setup.env.root) / "body.bin"
    body.write_bytes(data)
    name = f"up-{len(framing)}-{framing[-1][:6] if framing else 'cl'}.bin"
    result = setup.get(f"/upload/{name}", "-X", "PUT", "--data-binary", f"@{body}", *framing)
    assert result.status in (201, 204), result
    assert setup.nginx.uploaded_sha256(name) == hashlib.sha256(data).hexdigest()


def test_upstream_connections_are_pooled(setup: Setup) -> None:
    mark = setup.nginx.mark()
    for _ in range(50):
        assert setup.get("/echo").status == 200
    connections = setup.nginx.connections(mark, wait_for=50)
    assert len(connections) <= 2, connections


def test_a_pooled_connection_idle_for_pool_idle_timeout_is_closed(
    make_setup: Callable[..., Setup],
) -> None:
    setup = make_setup('[limits]\npool_idle_timeout = "0.5s"\n')
    first = setup.get("/echo").header("X-Connection")
    assert setup.get("/echo").header("X-Connection") == first  # reused while fresh
    time.sleep(1.0)  # the setting under test is a time: nothing to await but it
    assert setup.get("/echo").header("X-Connection") != first


def test_lock_closes_pooled_connections(setup: Setup) -> None:
    before = setup.get("/echo").header("X-Connection")
    assert setup.get("/echo").header("X-Connection") == before  # reused
    setup.env.agentctl("lock")
    assert_agent_error(setup.get("/echo"), 423, "locked")
    unlock(setup.env)
    assert setup.get("/echo").header("X-Connection") != before


# --- the agent's own errors -----------------------------------------------------


def test_unbound_host_is_refused_and_nginx_sees_no_connection(setup: Setup) -> None:
    first = direct_connection_id(setup.pki, setup.nginx)
    result = setup.get("/echo", host=f"127.0.0.1:{setup.nginx.port}")
    last = direct_connection_id(setup.pki, setup.nginx)

    assert_agent_error(result, 403, "no-identity-for-host")
    assert last == first + 1, "the agent opened a connection for a host with no identity"


def test_locked_agent_answers_423(make_setup: Callable[..., Setup]) -> None:
    setup = make_setup(unlocked=False)
    first = direct_connection_id(setup.pki, setup.nginx)
    assert_agent_error(setup.get("/echo"), 423, "locked")
    assert direct_connection_id(setup.pki, setup.nginx) == first + 1


def test_untrusted_upstream_certificate_gives_502(setup: Setup, nginx_untrusted: Nginx) -> None:
    result = setup.get("/echo", host=nginx_untrusted.host_header)
    assert_agent_error(result, 502, "upstream-untrusted")
    assert "give the identity the CA that signed it (import --ca" in result.json()["message"]
    assert nginx_untrusted.access_log() == []


def test_refused_port_gives_502_at_once(setup: Setup) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = setup.get("/echo", host=f"localhost:{port}")
    assert_agent_error(result, 502, "upstream-unreachable")


@pytest.fixture
def silent_tcp_server() -> Iterator[int]:
    """Accepts TCP connections (the kernel does) and never says a word."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


def test_upstream_that_never_speaks_tls_gives_504(
    make_setup: Callable[..., Setup], silent_tcp_server: int
) -> None:
    setup = make_setup('[limits]\nconnect_timeout = "0.5s"\n')
    result = setup.get("/echo", host=f"localhost:{silent_tcp_server}")
    assert_agent_error(result, 504, "upstream-timeout")


@pytest.fixture
def mute_tls_server(pki: Pki) -> Iterator[int]:
    """Completes the mTLS handshake, reads the request, and never answers."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.root_pem))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(pki.server.cert_path), str(pki.server.key_path))
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            try:
                tls = context.wrap_socket(conn, server_side=True)
                tls.recv(65536)
                held.append(tls)
            except (OSError, ssl.SSLError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()
    for tls in held:
        tls.close()


def test_upstream_that_never_answers_gives_504(
    make_setup: Callable[..., Setup], mute_tls_server: int
) -> None:
    setup = make_setup('[limits]\nresponse_timeout = "0.5s"\n')
    result = setup.get("/echo", host=f"localhost:{mute_tls_server}")
    assert_agent_error(result, 504, "upstream-timeout")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: user@localhost\r\n\r\n",
        b"GET /echo HTTP/1.1\r\n\r\n",
    ],
    ids=["garbage", "two-hosts", "cl-and-te", "userinfo", "no-host"],
)
def test_malformed_requests_get_400_and_never_reach_nginx(
    setup: Setup, request_bytes: bytes
) -> None:
    mark = setup.nginx.mark()
    response = raw_exchange(setup.env.proxy_socket, request_bytes)
    assert raw_status(response) == 400
    assert b"\r\nMtls-Agent-Error: bad-request\r\n" in response
    assert raw_body_json(response)["error"] == "bad-request"
    assert setup.get("/echo").status == 200  # the agent keeps serving
    assert [e["request"] for e in setup.nginx.access_log(mark, wait_for=1)] == [
        "GET /echo HTTP/1.1"
    ]


# --- secrets --------------------------------------------------------------------


def _key_encodings(pki: Pki) -> dict[str, bytes]:
    key = pki.client.key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    body_lines = [line for line in pem.splitlines() if line and not line.startswith(b"-----")]
    encodings = {
        "pkcs8-der": key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        "sec1-der": key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
        "raw-scalar": key.private_numbers().private_value.to_bytes(32, "big"),
    }
    encodings.update({f"pem-line-{i}": line for i, line in enumerate(body_lines)})
    return encodings


def _files_under(*roots: Path, skip: tuple[Path, ...]) -> Iterator[Path]:
    for root in roots:
        for folder, dirs, files in os.walk(root):
            here = Path(folder)
            dirs[:] = [d for d in dirs if here / d not in skip]
            for name in files:
                path = here / name
                if path.is_file() and not path.is_symlink() and path.stat().st_size < 64 << 20:
                    yield path


def test_plaintext_key_never_touches_disk(setup: Setup) -> None:
    assert setup.get("/echo").status == 200
    encodings = _key_encodings(setup.pki)
    # the test PKI itself keeps the key in plaintext: that folder is the one exception
    skip = (setup.pki.dir,)
    roots = (setup.env.root, Path(tempfile.gettempdir()), Path("/dev/shm"))
    checked = 0
    for path in _files_under(*roots, skip=skip):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        checked += 1
        for what, needle in encodings.items():
            assert needle not in data, f"{path} holds the private key ({what})"
    assert checked > 0
    [identity_file] = (setup.env.vault_dir / "identities").glob("*.json")
    assert b"sealed_key" in identity_file.read_bytes()
    assert b"PRIVATE KEY" not in identity_file.read_bytes()


# --- bad input loses nothing ------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_wrong_vault_passphrase_is_refused_and_changes_nothing(setup: Setup) -> None:
    setup.env.agentctl("lock")
    before = _snapshot(setup.env.vault_dir)
    result = setup.env.agentctl(
        "unlock", "--passphrase-file", setup.env.passphrase_file("not it", "wrong"), check=False
    )
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "passphrase" in result.stderr.lower()
    assert _snapshot(setup.env.vault_dir) == before
    unlock(setup.env)  # the right one still works
    assert setup.get("/echo").status == 200


def _mismatched_p12(pki: Pki) -> bytes:
    """A key with a certificate that is not its own (cryptography refuses to pair
    them as key and certificate, so the certificate travels as an extra one)."""
    other = ec.generate_private_key(ec.SECP256R1())
    return pkcs12.serialize_key_and_certificates(
        b"mismatch",
        other,
        None,
        [pki.client.cert, pki.intermediate.cert],
        serialization.BestAvailableEncryption(P12_PASSWORD.encode()),
    )


@pytest.mark.parametrize("case", ["wrong-password", "truncated", "garbage", "key-mismatch"])
def test_bad_pkcs12_is_refused_with_one_sentence(
    agent_env: AgentEnv, pki: Pki, case: str
) -> None:
    init_vault(agent_env)
    import_identity(agent_env, pki, "first")
    before = _snapshot(agent_env.vault_dir)
    good = pki.client_p12("modern").read_bytes()
    data = {
        "wrong-password": lambda: good,
        "truncated": lambda: good[: len(good) // 2],
        "garbage": lambda: b"not a pkcs12 file at all\n",
        "key-mismatch": lambda: _mismatched_p12(pki),
    }[case]()
    p12 = Path(agent_env.root) / f"{case}.p12"
    p12.write_bytes(data)
    password = P12_PASSWORD if case != "wrong-password" else "wrong password"
    password_file = write_secret_file(agent_env.root, password, f"{case}-password")
    result = agent_env.agentctl(
        "import", "second", p12, "--host", "other.example.com",
        "--p12-password-file", password_file, check=False,
    )  # fmt: skip

    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agentctl: "), result.stderr
    assert "Traceback" not in result.stderr
    assert _snapshot(agent_env.vault_dir) == before


def test_legacy_pkcs12_imports_and_serves(agent_env: AgentEnv, pki: Pki, nginx: Nginx) -> None:
    init_vault(agent_env)
    imported = import_identity(agent_env, pki, "legacy", pki.client_p12("legacy"))
    assert "imported legacy" in imported.stdout
    agent = start_agent(agent_env)
    try:
        unlock(agent_env)
        result = curl(agent_env.proxy_socket, f"http://{nginx.host_header}/echo")
        assert result.status == 200 and result.header("X-Client-Verify") == "SUCCESS"
    finally:
        agent.stop()


# --- big bodies stream ------------------------------------------------------------


@pytest.mark.slow
def test_512_mib_each_way_streams_with_bounded_memory(setup: Setup) -> None:
    size = 512 * 1024 * 1024
    _, expected = setup.nginx.make_file("big.bin", size)
    digest = hashlib.sha256()
    exe = require_tool("curl")
    url = f"http://{setup.nginx.host_header}/files/big.bin"
    with subprocess.Popen(
        [exe, "-sS", "--fail", "--unix-socket", str(setup.env.proxy_socket), url],
        stdout=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None
        while piece := proc.stdout.read(1 << 20):
            digest.update(piece)
    assert proc.returncode == 0
    assert digest.hexdigest() == expected

    upload = setup.nginx.files_dir / "big.bin"
    result = setup.get(
        "/upload/big-up.bin", "-X", "PUT", "-T", str(upload), "-H", "Expect:"
    )
    assert result.status in (201, 204), result
    assert setup.nginx.uploaded_sha256("big-up.bin") == expected

    peak_mib = setup.agent.peak_rss_kib() / 1024
    print(f"agent peak RSS after 512 MiB down and up: {peak_mib:.1f} MiB")
    assert peak_mib < 100
    upload.unlink()
    setup.nginx.uploaded("big-up.bin").unlink()


# --- the CLI around it ------------------------------------------------------------


def test_cli_reports_list_status_env_and_removes(setup: Setup) -> None:
    listed = json.loads(setup.env.agentctl("list", "--json").stdout)
    [work] = [i for i in listed if i["name"] == "work"]
    assert work["loaded"] is True
    assert work["hosts"] == ["localhost"]
    assert work["subject"] == "CN=mtls-agent test client,O=mtls-agent tests"
    assert work["fingerprint_sha256"]

    setup.get("/echo")
    status = json.loads(setup.env.agentctl("status", "--json").stdout)
    assert status["state"] == "unlocked"
    assert status["identities"] == 1
    assert status["requests_served"] >= 1
    assert status["sockets"]["proxy"] == str(setup.env.proxy_socket)

    env_line = setup.env.agentctl("env").stdout.strip()
    assert env_line == f"export MTLS_AGENT_SOCK={setup.env.proxy_socket}"

    setup.env.agentctl("remove", "work")
    assert_agent_error(setup.get("/echo"), 403, "no-identity-for-host")
    assert json.loads(setup.env.agentctl("list", "--json").stdout) == []
