"""Enrollment as a user runs it: ``agentctl enroll`` against real test servers.

The EST server and the registration service run in this process (aiohttp
over TLS, certificates from the test PKI) and record every request, so the
tests can assert what reached them: only a CSR, never a byte of the key;
the token only behind a matching pin. ``agentctl`` and ``mtls-agent`` run
as subprocesses and reach them over loopback; nginx is the upstream that
proves an enrolled identity works.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import email.utils
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from support.agent import AgentEnv, console_script, start_agent, write_secret_file
from support.clients import curl
from support.est_server import EstServer
from support.nginx import Nginx
from support.pki import P12_PASSWORD, Pki, p12_modern
from support.registration_server import RegistrationServer

from agent.errors import EnrollmentError, IdentityExpired, Locked
from agent.est import parse_certs_only, retry_after
from agent.identity import PENDING_FORMAT, Identity, new_identity
from agent.keychain import Keychain
from agent.vault import Vault
from agent.webclient import Answer

PASSPHRASE = "correct horse battery staple"
CHEAP_KDF_N = 2**12
TOKEN = "reg-7f3a9c-one-time-token"


@pytest.fixture
def vault(agent_env: AgentEnv) -> Vault:
    """An empty vault with PASSPHRASE, made in-process with a cheap KDF."""
    v = Vault(agent_env.vault_dir)
    v.create(PASSPHRASE, kdf_n=CHEAP_KDF_N)
    return v


@pytest.fixture
def est(pki: Pki) -> Iterator[EstServer]:
    server = EstServer(pki).start()
    try:
        yield server
    finally:
        server.stop()


def enroll_est(  # type: ignore[no-untyped-def]
    env: AgentEnv,
    server: EstServer,
    name: str,
    *args: str | Path,
    host: str = "localhost",
    check: bool = True,
):
    return env.agentctl(
        "enroll", name, "--est", server.url, "--host", host, "--ca", server.pki.root_pem,
        *args, check=check,
    )  # fmt: skip


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def open_key(vault: Vault, name: str) -> ec.EllipticCurvePrivateKey:
    """The sealed key of ``name``, opened here the way the agent does at unlock."""
    key = vault.open_key(name, vault.unlock_key(PASSPHRASE))
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def key_encodings(key: ec.EllipticCurvePrivateKey) -> dict[str, bytes]:
    """Every form in which the key's secret could leak."""
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    raw = key.private_numbers().private_value.to_bytes(32, "big")
    return {
        "PKCS#8 DER": der,
        "PKCS#8 base64": base64.b64encode(der)[8:72],
        "raw scalar": raw,
        "raw scalar hex": raw.hex().encode(),
        "raw scalar base64": base64.b64encode(raw)[:40],
    }


def decoded_forms(body: bytes) -> list[bytes]:
    """A body as sent, and its base64 decoding when it is base64."""
    forms = [body]
    with contextlib.suppress(binascii.Error, ValueError):
        forms.append(base64.b64decode(b"".join(body.split()), validate=True))
    return forms


def csr_of(body: bytes) -> x509.CertificateSigningRequest:
    return x509.load_der_x509_csr(base64.b64decode(b"".join(body.split())))


def stderr_line(result) -> str:  # type: ignore[no-untyped-def]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agentctl: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# --- EST ------------------------------------------------------------------------------


def test_est_enrollment_sends_only_a_csr_and_no_byte_of_the_key(
    agent_env: AgentEnv, vault: Vault, est: EstServer, pki: Pki, nginx: Nginx
) -> None:
    est.authorization = "Basic " + base64.b64encode(b"device-7:s3cret pass").decode()
    password = write_secret_file(agent_env.root, "s3cret pass", "est-password")
    result = enroll_est(
        agent_env, est, "work", "--subject", "CN=device-7,O=Example",
        "--san", "DNS:device-7.example.com", "--username", "device-7", "--password-file", password,
    )  # fmt: skip

    assert result.stdout.startswith("enrolled work: CN=device-7,O=Example, expires ")
    assert [(r.method, r.path) for r in est.requests] == [
        ("GET", "/.well-known/est/cacerts"),
        ("POST", "/.well-known/est/simpleenroll"),
    ]
    post = est.requests[1]
    assert post.headers["Content-Type"] == "application/pkcs10"
    csr = csr_of(post.body)
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == "CN=device-7,O=Example"
    key = open_key(vault, "work")
    assert csr.public_key() == key.public_key()
    for request in est.requests:
        for form in decoded_forms(request.body):
            for what, needle in key_encodings(key).items():
                assert needle not in form, f"{request.path} received the key ({what})"

    [issued] = est.issued
    identity = Identity.from_metadata("work", vault.read_metadata("work"))
    assert identity.leaf == issued
    assert identity.chain == (issued, pki.intermediate.cert)  # the root is not sent
    assert (
        identity.ca_pem is not None
        and pki.root.cert.public_bytes(serialization.Encoding.PEM) in identity.ca_pem
    )
    assert identity.source["kind"] == "est" and identity.source["url"] == est.url
    assert b"s3cret pass" not in (vault.directory / "identities" / "work.json").read_bytes()

    listed = agent_env.agentctl("list").stdout
    assert f"source:      est {est.url}" in listed
    assert "renews:      20" in listed

    agent = start_agent(agent_env)
    try:
        agent_env.agentctl("unlock", "--passphrase-file", agent_env.passphrase_file(PASSPHRASE))
        answer = curl(agent_env.proxy_socket, f"http://{nginx.host_header}/echo")
        assert answer.status == 200, answer.body
        assert answer.header("X-Client-Verify") == "SUCCESS"
        assert int(answer.header("X-Client-Serial") or "0", 16) == issued.serial_number
    finally:
        agent.stop()


def test_est_key_is_sealed_in_the_vault_before_the_csr_is_sent(
    agent_env: AgentEnv, vault: Vault, est: EstServer
) -> None:
    seen: list[dict] = []
    est.on_enroll = lambda _csr: seen.append(
        {"names": vault.names(), "file": (vault.directory / "identities" / "work.json").read_text()}
    )
    enroll_est(agent_env, est, "work")

    [at_csr_time] = seen
    assert at_csr_time["names"] == ["work"]
    assert f'"format": "{PENDING_FORMAT}"' in at_csr_time["file"]
    assert '"sealed_key"' in at_csr_time["file"]
    assert "PRIVATE KEY" not in at_csr_time["file"]
    sent = csr_of(est.enroll_requests()[0].body)
    assert sent.public_key() == open_key(vault, "work").public_key()


def test_est_202_is_waited_out_with_progress_resending_the_same_csr(
    agent_env: AgentEnv, vault: Vault, est: EstServer
) -> None:
    est.pending = 2
    result = enroll_est(agent_env, est, "work")

    posts = est.enroll_requests()
    assert len(posts) == 3
    assert posts[0].body == posts[1].body == posts[2].body
    progress = [line for line in result.stderr.splitlines() if "not issued" in line]
    assert len(progress) == 2, result.stderr
    assert "asking again in 1 s" in progress[0]
    assert result.stdout.startswith("enrolled work: ")


def test_est_enrollment_left_pending_resumes_with_the_same_key(
    agent_env: AgentEnv, vault: Vault, est: EstServer
) -> None:
    est.pending = 100
    first = enroll_est(agent_env, est, "work", "--wait", "0", check=False)
    assert first.returncode == 1
    assert "run the same command again later to resume" in stderr_line(first)
    pending_file = (vault.directory / "identities" / "work.json").read_text()
    assert PENDING_FORMAT in pending_file
    listed = agent_env.agentctl("list").stdout
    assert "work (enrollment pending)" in listed
    assert "waiting for its EST enrollment to finish" in listed
    [row] = json.loads(agent_env.agentctl("list", "--json").stdout)
    assert row["pending"] is True and "waiting for its EST" in row["broken"]

    est.pending = 0
    second = enroll_est(agent_env, est, "work")
    assert "resuming the pending enrollment of 'work'" in second.stderr
    first_csr, second_csr = (r.body for r in est.enroll_requests())
    assert first_csr == second_csr
    identity = Identity.from_metadata("work", vault.read_metadata("work"))
    assert identity.leaf.public_key() == open_key(vault, "work").public_key()
    assert identity.leaf.public_key() == csr_of(first_csr).public_key()


def test_est_enrollment_killed_after_sending_the_csr_loses_nothing(
    agent_env: AgentEnv, vault: Vault, est: EstServer
) -> None:
    est.pending, est.retry_after = 100, "30"
    command = [*console_script("agentctl", "cli"), "enroll", "work", "--est", est.url,
               "--host", "localhost", "--ca", str(est.pki.root_pem)]  # fmt: skip
    process = subprocess.Popen(
        command, env=agent_env.env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not est.enroll_requests():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        process.kill()  # dies while waiting out the 202, the CSR sent
        process.wait()

    est.pending = 0
    resumed = enroll_est(agent_env, est, "work")
    assert "resuming the pending enrollment" in resumed.stderr
    first_csr, second_csr = (r.body for r in est.enroll_requests())
    assert first_csr == second_csr
    identity = Identity.from_metadata("work", vault.read_metadata("work"))
    assert identity.leaf.public_key() == open_key(vault, "work").public_key()


def test_est_bodies_are_read_as_base64_with_any_white_space_pem_or_der(pki: Pki) -> None:
    der = pkcs7.serialize_certificates([pki.intermediate.cert], serialization.Encoding.DER)
    text = base64.b64encode(der)
    for body in (
        text,
        b"\r\n".join(text[i : i + 64] for i in range(0, len(text), 64)) + b"\r\n",
        b" \t" + b"\n  ".join(text[i : i + 10] for i in range(0, len(text), 10)) + b"\n",
        b"-----BEGIN PKCS7-----\n" + text + b"\n-----END PKCS7-----\n",
        der,
    ):
        assert parse_certs_only(body) == [pki.intermediate.cert]
    for garbage in (b"", b"hello", text[: len(text) // 2], b"\x30\x03\x02\x01"):
        with pytest.raises(EnrollmentError):
            parse_certs_only(garbage)


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    in_a_minute = email.utils.format_datetime(
        dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60), usegmt=True
    )
    for header, low, high in (("7", 7, 7), (in_a_minute, 55, 60), ("soon", 10, 10), ("0", 1, 1)):
        answer = Answer(202, {"Retry-After": header}, b"")
        assert low <= retry_after(answer) <= high, header


def test_est_without_the_credentials_it_wants_fails_clearly_then_a_token_works(
    agent_env: AgentEnv, vault: Vault, est: EstServer
) -> None:
    est.authorization = f"Bearer {TOKEN}"
    before = snapshot(vault.directory)
    refused = enroll_est(agent_env, est, "work", check=False)
    assert refused.returncode == 1
    line = stderr_line(refused)
    assert "HTTP 401" in line and "--username" in line and "--token-file" in line
    assert snapshot(vault.directory) == before

    token = write_secret_file(agent_env.root, TOKEN + "\n", "token")
    enroll_est(agent_env, est, "work", "--token-file", token)
    assert est.enroll_requests()[-1].headers["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN.encode() not in (vault.directory / "identities" / "work.json").read_bytes()


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        ("malformed", "not a readable PKCS#7"),
        ("no-leaf", "no certificate for our key"),
        ("foreign-key", "for another public key"),
        ("other-subject", "'CN=somebody else'"),
    ],
)
def test_bad_est_answers_are_refused_and_leave_the_vault_unchanged(
    agent_env: AgentEnv, vault: Vault, est: EstServer, answer: str, words: str
) -> None:
    enroll_est(agent_env, est, "first")
    before = snapshot(vault.directory)
    est.answer = answer  # type: ignore[assignment]
    result = enroll_est(agent_env, est, "second", host="other.example.com", check=False)
    assert result.returncode == 1
    line = stderr_line(result)
    assert line.startswith("agentctl: cannot enroll second: ") and words in line, line
    assert snapshot(vault.directory) == before


def test_est_server_that_is_not_trusted_receives_nothing(
    agent_env: AgentEnv, vault: Vault, est: EstServer
) -> None:
    result = agent_env.agentctl(
        "enroll", "work", "--est", est.url, "--host", "localhost",
        "--ca", est.pki.other_root.cert_path, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "is not trusted" in stderr_line(result)
    assert est.requests == []
    assert vault.names() == []


# --- PKCS#12 from a registration service ------------------------------------------------


@pytest.fixture
def registration(pki: Pki) -> Iterator[RegistrationServer]:
    blob = p12_modern(pki.client.key, pki.client.chain, P12_PASSWORD)
    server = RegistrationServer(pki, blob, TOKEN).start()
    try:
        yield server
    finally:
        server.stop()


def enroll_p12(env: AgentEnv, server: RegistrationServer, *args: str | Path, token: str = TOKEN):  # type: ignore[no-untyped-def]
    token_file = write_secret_file(env.root, token, "token")
    password = write_secret_file(env.root, P12_PASSWORD, "p12-password")
    return env.agentctl(
        "enroll", "reg", "--p12-url", server.url("/p12/device-7?once=q-secret"),
        "--token-file", token_file, "--p12-password-file", password,
        "--host", "localhost", "--ca", server.pki.root_pem, *args, check=False,
    )  # fmt: skip


def test_pkcs12_from_a_registration_service_is_fetched_with_the_token_and_serves(
    agent_env: AgentEnv, vault: Vault, registration: RegistrationServer, pki: Pki, nginx: Nginx
) -> None:
    pin = "sha256/" + pki.server.spki_sha256  # one slash: the short spelling
    result = enroll_p12(agent_env, registration, "--pin", pin, "--upstream-ca", str(pki.root_pem))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("imported reg: ")
    assert registration.requests[-1].authorization == f"Bearer {TOKEN}"
    assert registration.requests[-1].path_qs == "/p12/device-7?once=q-secret"
    for output in (result.stdout, result.stderr):
        assert TOKEN not in output
    for path, data in snapshot(vault.directory).items():
        assert TOKEN.encode() not in data, path
        assert b"q-secret" not in data, path  # nor the query of the link
    listed = agent_env.agentctl("list").stdout
    assert f"source:      pkcs12-url {registration.url('/p12/device-7')}" in listed
    assert "renews:      no" in listed

    agent = start_agent(agent_env)
    try:
        agent_env.agentctl("unlock", "--passphrase-file", agent_env.passphrase_file(PASSPHRASE))
        answer = curl(agent_env.proxy_socket, f"http://{nginx.host_header}/echo")
        assert answer.status == 200, answer.body
        assert answer.header("X-Client-Serial") == pki.client.serial_hex
    finally:
        agent.stop()
    assert TOKEN not in agent.stderr_text()


def test_wrong_pin_refuses_the_server_before_the_token_is_sent(
    agent_env: AgentEnv, vault: Vault, registration: RegistrationServer, pki: Pki
) -> None:
    before = snapshot(vault.directory)
    result = enroll_p12(agent_env, registration, "--pin", "sha256//" + pki.other_server.spki_sha256)
    assert result.returncode == 1
    line = stderr_line(result)
    assert "matches none of the given pins; nothing was sent" in line
    assert registration.handshakes >= 1  # it did connect...
    assert registration.requests == []  # ...and sent no request, so no Authorization header
    assert TOKEN not in result.stderr
    assert snapshot(vault.directory) == before


def test_wrong_token_is_a_clear_error(
    agent_env: AgentEnv, vault: Vault, registration: RegistrationServer
) -> None:
    before = snapshot(vault.directory)
    result = enroll_p12(agent_env, registration, token="not-the-token")
    assert result.returncode == 1
    assert "refused the token (HTTP 401)" in stderr_line(result)
    assert "not-the-token" not in result.stderr
    assert snapshot(vault.directory) == before


def test_truncated_pkcs12_from_the_server_leaves_the_vault_unchanged(
    agent_env: AgentEnv, vault: Vault, registration: RegistrationServer
) -> None:
    before = snapshot(vault.directory)
    registration.blob = registration.blob[: len(registration.blob) // 2]
    result = enroll_p12(agent_env, registration)
    assert result.returncode == 1
    assert "not a readable PKCS#12 file" in stderr_line(result)
    assert snapshot(vault.directory) == before


def test_a_plain_http_url_is_refused_before_anything_is_sent(
    agent_env: AgentEnv, vault: Vault
) -> None:
    token = write_secret_file(agent_env.root, TOKEN, "token")
    result = agent_env.agentctl(
        "enroll", "reg", "--p12-url", "http://register.example.com/p12/1",
        "--token-file", token, "--host", "localhost", check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "must start with https://" in stderr_line(result)


# --- expired identities --------------------------------------------------------------------


def test_expired_identity_is_not_presented_and_says_when_and_how_to_renew(
    agent_env: AgentEnv, vault: Vault, pki: Pki, nginx: Nginx
) -> None:
    yesterday = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    leaf = pki.issue_client(
        "expired client", not_before=yesterday - dt.timedelta(days=1), not_after=yesterday
    )
    p12 = pki.client_p12(leaf=leaf)
    password = write_secret_file(agent_env.root, P12_PASSWORD, "p12-password")
    agent_env.agentctl(
        "import", "old", p12, "--host", "localhost", "--ca", pki.root_pem,
        "--p12-password-file", password,
    )  # fmt: skip
    agent = start_agent(agent_env)
    try:
        agent_env.agentctl("unlock", "--passphrase-file", agent_env.passphrase_file(PASSPHRASE))
        mark = nginx.mark()
        answer = curl(agent_env.proxy_socket, f"http://{nginx.host_header}/echo")
    finally:
        agent.stop()
    assert answer.status == 403
    assert answer.header("Mtls-Agent-Error") == "identity-expired"
    message = answer.json()["message"]
    assert leaf.cert.not_valid_after_utc.isoformat() in message
    assert "'agentctl import old FILE.p12" in message
    assert nginx.access_log(mark) == []


async def test_a_kept_route_is_not_used_past_its_expiry_or_after_a_lock(
    agent_env: AgentEnv, vault: Vault, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Routes are kept between requests: the keeping must not outlive the
    identity's validity or the unlocked state."""
    leaf = pki.issue_client(lifetime=dt.timedelta(hours=1))
    identity = new_identity("soon", leaf.key, leaf.chain, ["api.example.com"])
    vault.store("soon", identity.to_metadata(), leaf.key)
    keychain = Keychain(vault, agent_env.runtime_dir)
    await keychain.unlock(PASSPHRASE)
    first = keychain.route("api.example.com", 443)
    assert keychain.route("api.example.com", 443) is first
    later = identity.not_after.timestamp() + 1
    monkeypatch.setattr("agent.keychain.time.time", lambda: later)
    with pytest.raises(IdentityExpired):
        keychain.route("api.example.com", 443)
    monkeypatch.undo()
    assert keychain.route("api.example.com", 443) is first
    keychain.lock()
    with pytest.raises(Locked):
        keychain.route("api.example.com", 443)


async def test_expired_est_identity_says_to_run_agentctl_renew(
    agent_env: AgentEnv, vault: Vault, pki: Pki
) -> None:
    an_hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    leaf = pki.issue_client(not_before=an_hour_ago - dt.timedelta(hours=1), not_after=an_hour_ago)
    identity = new_identity(
        "dev",
        leaf.key,
        leaf.chain,
        ["api.example.com"],
        source={"kind": "est", "url": "https://ca/"},
    )
    vault.store("dev", identity.to_metadata(), leaf.key)
    keychain = Keychain(vault, agent_env.runtime_dir)
    await keychain.unlock(PASSPHRASE)
    with pytest.raises(IdentityExpired) as raised:
        keychain.route("api.example.com", 443)
    assert "try 'agentctl renew dev'" in raised.value.message
    assert identity.not_after.isoformat() in raised.value.message
