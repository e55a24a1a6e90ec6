"""The test infrastructure itself, proved against the real parts.

These pin the design of every end-to-end test: nginx trusts only the root,
so a client is accepted only with its intermediate; curl, openssl and the
PKCS#12 files are real; the access log tells connections apart.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import pkcs12
from support.agent import AgentEnv, start_agent
from support.nginx import Nginx, parse_access_line
from support.pki import CLIENT_CN, P12_PASSWORD, CertKey, Pki, make_leaf, write_cert_key
from support.tools import (
    curl,
    deterministic_chunks,
    deterministic_sha256,
    require_tool,
    sha256_file,
)


def trust(pki: Pki, server: Nginx) -> list[str]:
    """curl options: trust the test root and reach localhost on 127.0.0.1."""
    return ["--cacert", str(pki.root_pem), "--resolve", f"localhost:{server.port}:127.0.0.1"]


def present(leaf: CertKey, *, with_intermediate: bool = True) -> list[str]:
    """curl options that present ``leaf`` (with or without its intermediate)."""
    cert = leaf.chain_path if with_intermediate and leaf.chain_path else leaf.cert_path
    return ["--cert", str(cert), "--key", str(leaf.key_path)]


# --- nginx demands a certificate that chains to the root ----------------------


def test_nginx_refuses_a_client_without_a_certificate(pki: Pki, nginx: Nginx) -> None:
    r = curl(*trust(pki, nginx), nginx.url("/echo"))
    assert r.returncode == 0, r.stderr
    assert r.status == 400
    assert "No required SSL certificate was sent" in r.text


def test_nginx_accepts_curl_presenting_leaf_and_intermediate_and_echoes_the_subject(
    pki: Pki, nginx: Nginx
) -> None:
    r = curl(*trust(pki, nginx), *present(pki.client), nginx.url("/echo/path?q=1"))
    assert r.returncode == 0, r.stderr
    assert r.status == 200
    assert r.body == b"ok\n"
    assert f"CN={CLIENT_CN}" in (r.header("X-Client-S-DN") or "")
    assert r.header("X-Client-Serial") == pki.client.serial_hex
    assert r.header("X-Client-Verify") == "SUCCESS"
    assert r.header("X-Request-Method") == "GET"
    assert r.header("X-Request-Uri") == "/echo/path?q=1"
    assert r.header("X-Host") == nginx.host_header


def test_nginx_refuses_the_leaf_without_its_intermediate(pki: Pki, nginx: Nginx) -> None:
    # nginx trusts only the root: the leaf alone does not chain, so an identity
    # must send its intermediates in the handshake.
    r = curl(*trust(pki, nginx), *present(pki.client, with_intermediate=False), nginx.url("/echo"))
    assert r.returncode == 0, r.stderr
    assert r.status == 400
    assert "The SSL certificate error" in r.text


def test_a_new_short_lived_leaf_is_signed_by_the_intermediate_and_accepted(
    pki: Pki, nginx: Nginx
) -> None:
    leaf = pki.issue_client("short lived", lifetime=dt.timedelta(seconds=30))
    leaf.cert.verify_directly_issued_by(pki.intermediate.cert)
    left = leaf.cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(seconds=0) < left <= dt.timedelta(seconds=30)
    assert leaf.serial_hex != pki.client.serial_hex
    r = curl(*trust(pki, nginx), *present(leaf), nginx.url("/echo"))
    assert r.status == 200, r.text
    assert r.header("X-Client-Serial") == leaf.serial_hex
    assert "CN=short lived" in (r.header("X-Client-S-DN") or "")


def test_serial_hex_spells_serials_as_nginx_does(pki: Pki, nginx: Nginx, tmp_path: Path) -> None:
    # An odd number of hex digits gets a leading 0, as OpenSSL prints the serial's bytes.
    cert, key = make_leaf(pki.intermediate, "odd serial", usage="client", serial=0xABC)
    leaf = write_cert_key(tmp_path, "odd", cert, key, (pki.intermediate.cert,))
    assert leaf.serial_hex == "0ABC"
    r = curl(*trust(pki, nginx), *present(leaf), nginx.url("/echo"))
    assert r.header("X-Client-Serial") == "0ABC"


def test_an_expired_leaf_is_refused_by_nginx(pki: Pki, nginx: Nginx) -> None:
    now = dt.datetime.now(dt.UTC)
    leaf = pki.issue_client(
        "expired", not_before=now - dt.timedelta(days=2), not_after=now - dt.timedelta(days=1)
    )
    r = curl(*trust(pki, nginx), *present(leaf), nginx.url("/echo"))
    assert r.status == 400
    assert "The SSL certificate error" in r.text


def test_an_untrusted_upstream_fails_verification(pki: Pki, nginx_untrusted: Nginx) -> None:
    r = curl(*trust(pki, nginx_untrusted), *present(pki.client), nginx_untrusted.url("/echo"))
    assert r.returncode == 60, r.stderr  # curl: peer certificate cannot be authenticated
    # ... while it is a working server for whoever trusts the other root.
    r = curl(
        "--cacert",
        str(pki.other_root.cert_path),
        "--resolve",
        f"localhost:{nginx_untrusted.port}:127.0.0.1",
        *present(pki.client),
        nginx_untrusted.url("/echo"),
    )
    assert r.status == 200, r.stderr


# --- what the origin serves -----------------------------------------------------


def test_access_log_tells_connections_and_clients_apart(pki: Pki, nginx: Nginx) -> None:
    mark = nginx.mark()
    exe = require_tool("curl")
    base = [exe, "-sS", *trust(pki, nginx), *present(pki.client)]
    # Two requests on one keep-alive connection, then one on a new connection.
    subprocess.run(
        [*base, "-o", "/dev/null", "-o", "/dev/null", nginx.url("/echo/a"), nginx.url("/echo/b")],
        check=True,
        timeout=30,
    )
    subprocess.run([*base, "-o", "/dev/null", nginx.url("/echo/c")], check=True, timeout=30)

    entries = nginx.access_log(mark, wait_for=3)
    assert [e["uri"] for e in entries] == ["/echo/a", "/echo/b", "/echo/c"]
    assert [e["connection_requests"] for e in entries] == [1, 2, 1]
    assert entries[0]["connection"] == entries[1]["connection"] != entries[2]["connection"]
    assert nginx.connections(mark) == {entries[0]["connection"], entries[2]["connection"]}
    for e in entries:
        assert e["method"] == "GET"
        assert e["protocol"] == "HTTP/1.1"
        assert e["status"] == 200
        assert e["client_serial"] == pki.client.serial_hex
        assert f"CN={CLIENT_CN}" in e["client_s_dn"]
        assert e["ssl_protocol"] == "TLSv1.3"
        assert e["bytes_sent"] > 0
        assert e["request_length"] > 0


def test_access_log_parser_reads_escapes_and_dashes() -> None:
    line = '7 1 "-" - "GET /a\\x22b HTTP/1.1" 400 80 230 TLSv1.2\n'
    assert parse_access_line(line) == {
        "connection": 7,
        "connection_requests": 1,
        "client_s_dn": None,
        "client_serial": None,
        "request": 'GET /a"b HTTP/1.1',
        "method": "GET",
        "uri": '/a"b',
        "protocol": "HTTP/1.1",
        "status": 400,
        "request_length": 80,
        "bytes_sent": 230,
        "ssl_protocol": "TLSv1.2",
    }
    garbage = parse_access_line('3 1 "-" - "\\x16\\x03" 400 0 150 -')
    assert garbage["method"] is None
    assert garbage["ssl_protocol"] is None


def test_dav_put_stores_a_chunked_upload(pki: Pki, nginx: Nginx) -> None:
    size = 3 * 1024 * 1024 + 123
    body = b"".join(deterministic_chunks("chunked-upload", size))
    mark = nginx.mark()
    r = curl(
        *trust(pki, nginx),
        *present(pki.client),
        "-T",
        "-",
        "-H",
        "Transfer-Encoding: chunked",
        nginx.url("/upload/dir/chunked.bin"),
        input=body,
    )
    assert r.returncode == 0, r.stderr
    assert r.status == 201
    assert nginx.uploaded_sha256("dir/chunked.bin") == deterministic_sha256("chunked-upload", size)
    (entry,) = nginx.access_log(mark, wait_for=1)
    assert entry["method"] == "PUT"
    assert entry["request_length"] > size  # body plus chunk framing
    # ... and it reads back.
    back = curl(*trust(pki, nginx), *present(pki.client), nginx.url("/upload/dir/chunked.bin"))
    assert back.status == 200
    assert back.body == body


def test_static_files_serve_big_deterministic_files(pki: Pki, nginx: Nginx, tmp_path: Path) -> None:
    size = 8 * 1024 * 1024 + 7
    path, digest = nginx.make_file("big.bin", size)
    assert path.stat().st_size == size
    assert digest == deterministic_sha256("big.bin", size) == sha256_file(path)
    out = tmp_path / "download"
    r = curl(*trust(pki, nginx), *present(pki.client), nginx.url("/files/big.bin"), output=out)
    assert r.status == 200, r.stderr
    assert r.header("Content-Length") == str(size)
    assert sha256_file(out) == digest


def test_cookies_redirect_and_error_statuses(pki: Pki, nginx: Nginx) -> None:
    def get(path: str):
        return curl(*trust(pki, nginx), *present(pki.client), nginx.url(path))

    cookies = get("/cookies")
    assert cookies.status == 200
    assert cookies.header_all("Set-Cookie") == ["first=1; Path=/", "second=2; Path=/; HttpOnly"]

    redirect = get("/redirect")
    assert redirect.status == 302
    assert (redirect.header("Location") or "").endswith("/echo/redirected")

    for code in (404, 500):
        r = get(f"/status/{code}")
        assert r.status == code
        assert r.text == f"status {code}\n"
    assert get("/no/such/thing").status == 404


# --- PKCS#12 --------------------------------------------------------------------


def openssl_p12_info(path: Path, *legacy: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("openssl"), "pkcs12", *legacy, "-info", "-noenc", "-in", str(path),
         "-passin", "env:MT_P12_PASSWORD"],
        env={**os.environ, "MT_P12_PASSWORD": P12_PASSWORD},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )  # fmt: skip


def test_legacy_p12_made_by_openssl_is_rc2_and_3des_with_the_intermediate(pki: Pki) -> None:
    path = pki.client_p12("legacy")
    info = openssl_p12_info(path, "-legacy")
    assert info.returncode == 0, info.stderr
    details = info.stdout + info.stderr
    assert "pbeWithSHA1And40BitRC2-CBC" in details
    assert "pbeWithSHA1And3-KeyTripleDES-CBC" in details
    assert info.stdout.count("BEGIN CERTIFICATE") == 2  # leaf and intermediate
    assert "mtls-agent test intermediate CA" in info.stdout
    assert "PRIVATE KEY" in info.stdout


def test_modern_p12_is_aes_and_readable_by_cryptography(pki: Pki) -> None:
    path = pki.client_p12("modern")
    p12 = pkcs12.load_pkcs12(path.read_bytes(), P12_PASSWORD.encode())
    assert p12.cert is not None and p12.key is not None
    assert p12.cert.certificate == pki.client.cert
    assert p12.key.public_key() == pki.client.key.public_key()
    assert [c.certificate for c in p12.additional_certs] == [pki.intermediate.cert]

    info = openssl_p12_info(path)
    assert info.returncode == 0, info.stderr
    assert "AES-256-CBC" in info.stdout + info.stderr


# --- require_tool: skip on a developer's machine, fail under CI -----------------


def test_require_tool_fails_under_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = "mtls-agent-no-such-tool"
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=missing):
        require_tool(missing)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=missing):
        require_tool(missing)


def test_require_tool_finds_sbin_programs_off_path(monkeypatch: pytest.MonkeyPatch) -> None:
    nginx = require_tool("nginx")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert require_tool("nginx") == nginx
    assert os.path.isabs(nginx)


# --- the agent's environment and start-up helper ---------------------------------


def test_agent_env_is_private_short_and_isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent")
    env = AgentEnv()
    try:
        assert len(os.fsencode(env.control_socket)) <= 107
        assert len(os.fsencode(env.proxy_socket)) <= 107
        assert env.env["MTLS_AGENT_SOCK"] == str(env.proxy_socket)
        assert env.env["XDG_RUNTIME_DIR"] == str(env.xdg_runtime_dir)
        assert "DBUS_SESSION_BUS_ADDRESS" not in env.env
        assert stat.S_IMODE(env.xdg_runtime_dir.stat().st_mode) == 0o700
        config = env.write_config('lock_after_idle = "1h"\n')
        assert config == env.config_file
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        secret = env.passphrase_file("correct horse")
        assert secret.read_text() == "correct horse"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    finally:
        env.cleanup()
    assert not env.root.exists()


# A stand-in for mtls-agent: binds both sockets where the agent would, then waits.
FAKE_AGENT = """
import os, signal, socket, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
folder = os.path.join(os.environ["XDG_RUNTIME_DIR"], "mtls-agent")
os.makedirs(folder, mode=0o700, exist_ok=True)
socks = []
for name in ("agent.sock", "control.sock"):
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.path.join(folder, name))
    s.listen()
    socks.append(s)
print("fake agent up", file=sys.stderr, flush=True)
signal.sigwait({signal.SIGTERM})
"""


def test_start_agent_waits_for_both_sockets_and_stops_with_sigterm(agent_env: AgentEnv) -> None:
    agent = start_agent(agent_env, command=[sys.executable, "-c", FAKE_AGENT])
    try:
        assert agent.alive()
        assert agent_env.proxy_socket.is_socket()
        assert agent_env.control_socket.is_socket()
        assert agent.peak_rss_kib() > 0
        assert "fake agent up" in agent.stderr_text()
    finally:
        code = agent.stop()
    assert code == 0


def test_start_agent_fails_with_the_agents_stderr_when_it_exits_early(
    agent_env: AgentEnv,
) -> None:
    with pytest.raises(pytest.fail.Exception, match="no vault here"):
        start_agent(agent_env, command=[sys.executable, "-c", "raise SystemExit('no vault here')"])


def test_deterministic_content_is_reproducible_and_exact() -> None:
    size = (1 << 20) * 2 + 5
    assert sum(len(c) for c in deterministic_chunks("a", size)) == size
    assert deterministic_sha256("a", size) == deterministic_sha256("a", size)
    assert deterministic_sha256("a", size) != deterministic_sha256("b", size)
    assert b"".join(deterministic_chunks("a", 10)) == b"".join(deterministic_chunks("a", 11))[:10]


def test_nginx_stops_on_sigterm(pki: Pki) -> None:
    require_tool("nginx")
    server = Nginx.for_pki(pki)
    with server:
        pid = server.pid
        assert pid is not None and server.alive()
        assert server.stop() == 0
    assert not server.root.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
