"""Property-based fuzzing of every parser of outside data: only the project's errors.

- the request head: the relay's pure functions, and the relay itself (the
  real ``ProxyServer`` in process, over socketpairs: ``head_harness``), fed
  heads built from HTTP's parts and from raw bytes;
- PKCS#12 blobs, PEM bundles, host patterns, pins, vault metadata;
- config.toml text;
- the control socket's JSON (the real agent, over its real socket);
- the EST client's PKCS#7 answers, certificate requests, subjects and SANs.

Each may refuse an input only with the project's own error types (and the
relay only with its wire errors), never with a stray exception.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.agent import AgentEnv, start_agent
from support.pki import P12_PASSWORD, Pki

from agent.config import parse_config
from agent.errors import (
    BadRequest,
    ConfigError,
    EnrollmentError,
    IdentityError,
    VaultError,
)
from agent.forward.http import (
    NOT_COPIED,
    field_lines,
    parse_authority,
    parse_target,
    request_fields,
    request_head,
    response_fields,
)
from agent.identity import HostPattern, Identity, check_pin, load_pem_certificates, load_pkcs12
from agent.vault import Vault
from faults.head_harness import HeadHarness
from faults.probe import exchange, record

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# --- building blocks of request heads ---------------------------------------------

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
tokens = st.text(TOKEN_CHARS, min_size=1, max_size=12).map(str.encode)
raw_bytes = st.binary(max_size=64)
methods = (
    st.sampled_from(
        [
            b"GET",
            b"POST",
            b"PUT",
            b"HEAD",
            b"OPTIONS",
            b"CONNECT",
            b"PRI",
            b"DELETE",
            b"get",
            b"G\x00T",
        ]
    )
    | tokens
)
hosts = (
    st.sampled_from(
        [
            b"a.example",
            b"localhost",
            b"[::1]",
            b"[::1",
            b"127.0.0.1",
            b"",
            b"user@a.example",
            b"a.example.",
            b"[fe80::1%25lo]",
            b"xn--d1a.example",
            b"a..example",
            b"*.example",
            b"-a.example",
        ]
    )
    | raw_bytes
)
ports = st.sampled_from(
    [b"", b":443", b":0", b":65535", b":65536", b":-1", b":", b":80x", b":00443"]
) | raw_bytes.map(lambda b: b":" + b)
authorities = st.builds(lambda h, p: h + p, hosts, ports)
paths = st.sampled_from([b"/", b"/echo", b"*", b"//x", b"/a b", b"/%00", b"/?q=1#f"]) | raw_bytes
targets = (
    paths
    | st.builds(
        lambda s, a, p: s + b"://" + a + p,
        st.sampled_from([b"http", b"https", b"ftp", b"HTTP", b""]),
        authorities,
        paths,
    )
    | authorities
)
versions = st.sampled_from(
    [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"HTTP/1", b"http/1.1", b""]
)
header_names = (
    st.sampled_from(
        [
            b"Host",
            b"host",
            b"Content-Length",
            b"Transfer-Encoding",
            b"Connection",
            b"Upgrade",
            b"Expect",
            b"TE",
            b"Keep-Alive",
            b"Proxy-Authorization",
            b"X-A",
        ]
    )
    | tokens
    | raw_bytes
)
header_values = (
    st.sampled_from(
        [
            b"chunked",
            b"gzip, chunked",
            b"identity",
            b"0",
            b"5",
            b"-1",
            b"1, 1",
            b"99999999999999999999",
            b"close",
            b"keep-alive, Upgrade",
            b"websocket",
            b"100-continue",
            b"a.example",
            b"\t chunked",
        ]
    )
    | authorities
    | raw_bytes
)
line_ends = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b" \r\n"])


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    end = draw(line_ends)
    parts = [draw(methods) + b" " + draw(targets) + b" " + draw(versions) + end]
    for name, value in draw(st.lists(st.tuples(header_names, header_values), max_size=8)):
        parts.append(name + draw(st.sampled_from([b": ", b":", b" : ", b":\t"])) + value + end)
    parts.append(draw(line_ends))
    parts.append(draw(st.binary(max_size=40)))  # a body, the next request, or junk
    return b"".join(parts)


requests = request_heads() | st.lists(request_heads(), min_size=2, max_size=3).map(b"".join)


# --- the request head: pure functions -----------------------------------------------


@FUZZ
@given(url=targets, host=st.none() | authorities, method=methods)
@example(url=b"/", host=b"[::1]:8443", method=b"GET")
def test_parse_target_raises_only_bad_request(url: bytes, host: bytes | None, method: bytes):
    try:
        origin, path = parse_target(url, host, method)
    except BadRequest:
        return
    assert origin.host and 0 < origin.port < 65536
    assert path.startswith(b"/") or path == b"*"
    authority = origin.authority  # encodable, so it can go upstream
    assert b"\r" not in authority and b"\n" not in authority and b" " not in authority
    assert b"@" not in authority and b"/" not in authority
    assert parse_authority(authority) == (origin.host, origin.port)
    # messages name the same origin, IPv6 in brackets ("[::1]:8443", not "::1:8443")
    assert parse_authority(origin.where.encode()) == (origin.host, origin.port)


@FUZZ
@given(raw=authorities)
def test_parse_authority_gives_a_canonical_host_or_bad_request(raw: bytes) -> None:
    try:
        host, port = parse_authority(raw)
    except BadRequest:
        return
    assert host == host.lower() and not host.endswith(".")
    assert 0 < port < 65536
    assert parse_authority(
        f"[{host}]:{port}".encode() if ":" in host else f"{host}:{port}".encode()
    ) == (host, port)


HOP_BY_HOP = {
    b"host",
    b"content-length",
    b"transfer-encoding",
    b"connection",
    b"upgrade",
    b"te",
    b"keep-alive",
    b"proxy-authorization",
}


def listed_by_connection(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }


#: What llhttp lets reach the relay's head functions: token names, values
#: without CR, LF or NUL. The relay runs them on nothing else.
parsed_fields = st.lists(
    st.tuples(
        header_names.filter(lambda n: all(chr(c) in TOKEN_CHARS for c in n) and n != b""),
        header_values.filter(lambda v: not any(c in v for c in b"\r\n\x00")),
    ),
    max_size=10,
)


def end_to_end_lines(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """What a rebuilt head must carry of ``headers``: the oracle for the relay's one pass."""
    assert HOP_BY_HOP <= NOT_COPIED
    dropped = NOT_COPIED | listed_by_connection(headers)
    return [name + b": " + value for name, value in headers if name.lower() not in dropped]


@FUZZ
@given(headers=parsed_fields)
def test_request_fields_raise_only_bad_request_and_never_copy_hop_by_hop(headers) -> None:
    try:
        lines, host, framing, upgrade = request_fields(headers)
    except BadRequest:
        return
    assert lines == end_to_end_lines(headers) == field_lines(headers)
    hosts = [v for n, v in headers if n.lower() == b"host"]
    assert host == (hosts[0] if hosts else None) and len(hosts) <= 1
    if framing == b"chunked":
        assert any(n.lower() == b"transfer-encoding" for n, _ in headers)
    elif framing is not None:
        assert framing.isdigit()
    head = request_head(b"GET", b"/", b"a.example", lines, framing, upgrade)
    assert head.endswith(b"\r\n\r\n") and head.count(b"\r\nHost: ") == 1


@FUZZ
@given(headers=parsed_fields)
def test_response_fields_never_copy_hop_by_hop(headers) -> None:
    codings = [v.strip().lower() for n, v in headers if n.lower() == b"transfer-encoding"]
    lines, length, coding = response_fields(headers)
    assert lines == end_to_end_lines(headers) == field_lines(headers)
    odd = [c for c in codings if c != b"chunked"]
    assert coding == (odd[0] if odd else codings[0] if codings else None)
    lengths = [v for n, v in headers if n.lower() == b"content-length"]
    assert length == (lengths[-1] if lengths else None)


# --- the request head: the real relay, in process -------------------------------------


@pytest.fixture(scope="module")
def harness() -> Iterator[HeadHarness]:
    h = HeadHarness()
    try:
        yield h
    finally:
        h.close()


@FUZZ
@given(data=requests)
@example(
    b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade\r\nUpgrade: ws\r\n\r\n"
    b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"
)
@example(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
@example(b"POST / HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
def test_the_relay_answers_any_request_head_with_its_own_errors_only(
    harness: HeadHarness, data: bytes
) -> None:
    harness.check(data)


@FUZZ
@given(data=st.binary(max_size=512))
def test_the_relay_answers_any_bytes_with_its_own_errors_only(
    harness: HeadHarness, data: bytes
) -> None:
    harness.check(data)


# --- PKCS#12, PEM, host patterns, pins, stored metadata ---------------------------------


@pytest.fixture(scope="module")
def p12_bytes(pki: Pki) -> bytes:
    return pki.client_p12("modern").read_bytes()


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    return bytes(buf)


edits = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=6)


#: UTF-8 passwords without NUL: the others are pinned on their own, below.
passwords = st.none() | st.text(max_size=12).map(str.encode).filter(lambda b: b"\0" not in b)


@FUZZ
@given(edit=edits, cut=st.none() | st.integers(0, 4096), password=passwords)
def test_load_pkcs12_raises_only_identity_error(p12_bytes, edit, cut, password) -> None:
    data = _mutate(p12_bytes, edit)[:cut]
    with contextlib.suppress(IdentityError):
        load_pkcs12(data, P12_PASSWORD.encode() if password is None else password)


@pytest.mark.parametrize("password", [b"\0", b"pass\0word", b"\x80", b"caf\xe9"])
def test_a_pkcs12_password_that_is_not_utf8_text_is_refused_as_identity_error(p12_bytes, password):
    """Found by the property above: cryptography panics (a BaseException) on a NUL in
    the password and raises a bare TypeError on bytes that are not UTF-8; a password
    file (--p12-password-file) can hold either."""
    with pytest.raises(IdentityError):
        load_pkcs12(p12_bytes, password)


@FUZZ
@given(data=st.binary(max_size=2048))
def test_load_pkcs12_of_random_bytes_raises_only_identity_error(data: bytes) -> None:
    with pytest.raises(IdentityError):
        load_pkcs12(data, P12_PASSWORD.encode())


@FUZZ
@given(edit=edits, cut=st.none() | st.integers(0, 2048), junk=st.binary(max_size=64))
def test_load_pem_certificates_raises_only_identity_error(pki: Pki, edit, cut, junk) -> None:
    pem = pki.client.chain_path.read_bytes()  # type: ignore[union-attr]
    data = _mutate(pem, edit)[:cut] + junk
    try:
        certs = load_pem_certificates(data)
    except IdentityError:
        return
    assert certs


@FUZZ
@given(text=st.text(max_size=80))
def test_host_patterns_and_pins_raise_only_identity_error(text: str) -> None:
    for parse in (HostPattern.parse, check_pin):
        with contextlib.suppress(IdentityError):
            parse(text)


@pytest.fixture(scope="module")
def bad_version_cert(pki: Pki) -> bytes:
    """The client certificate, DER, with its version field set to 1 (X.509 has 0 and 2)."""
    from cryptography.hazmat.primitives.serialization import Encoding

    der = bytearray(pki.client.cert.public_bytes(Encoding.DER))
    der[der.find(b"\xa0\x03\x02\x01\x02") + 4] = 1
    return bytes(der)


def test_a_pem_certificate_with_an_invalid_version_is_refused_as_identity_error(
    bad_version_cert: bytes,
) -> None:
    """Found by the EST property below: cryptography raises InvalidVersion, which is not
    a ValueError, for such a certificate; --ca bundles and stored chains are PEM."""
    body = base64.encodebytes(bad_version_cert)
    pem = b"-----BEGIN CERTIFICATE-----\n" + body + b"-----END CERTIFICATE-----\n"
    with pytest.raises(IdentityError):
        load_pem_certificates(pem)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def good_metadata(pki: Pki, p12_bytes: bytes) -> dict:
    from agent.identity import new_identity

    key, chain = load_pkcs12(p12_bytes, P12_PASSWORD.encode())
    return new_identity(
        "work", key, chain, ["localhost"], ca_pem=pki.root_pem.read_bytes()
    ).to_metadata()


@FUZZ
@given(field=st.text(max_size=12), value=json_values, drop=st.booleans())
def test_stored_metadata_raises_only_identity_error(good_metadata, field, value, drop) -> None:
    data = dict(good_metadata)
    key = field if field in data or not data else sorted(data)[len(field) % len(data)]
    if drop:
        data.pop(key, None)
    else:
        data[key] = value
    with contextlib.suppress(IdentityError):
        Identity.from_metadata("work", data)


@FUZZ
@given(
    doc=json_values
    | st.dictionaries(
        st.sampled_from(
            ["format", "version", "kdf", "wrap", "public_key", "metadata", "sealed_key"]
        ),
        json_values,
        max_size=7,
    ),
    raw=st.none() | st.binary(max_size=200),
)
def test_vault_files_raise_only_vault_error(tmp_path_factory, doc, raw) -> None:
    folder = tmp_path_factory.mktemp("vault")
    (folder / "identities").mkdir()
    data = raw if raw is not None else json.dumps(doc).encode()
    (folder / "vault.json").write_bytes(data)
    (folder / "identities" / "work.json").write_bytes(data)
    vault = Vault(folder)
    for read in (lambda: vault.unlock_key("passphrase"), lambda: vault.read_metadata("work")):
        with contextlib.suppress(VaultError):
            read()


# --- config.toml ----------------------------------------------------------------------

config_keys = st.sampled_from(
    [
        "lock_after_idle",
        "max_unlocked",
        "lock_on_suspend",
        "[limits]",
        "[proxy]",
        "head_timeout",
        "request_line",
        "allow_uids",
        "listen_backlog",
        "unknown",
    ]
)
config_values = st.sampled_from(
    [
        '"10s"',
        "0",
        "-1",
        "true",
        '"never"',
        "1e400",
        "[1, -2]",
        '"15 fortnights"',
        "nan",
        '""',
        "9" * 30,
    ]
) | st.text(max_size=10)


@FUZZ
@given(lines=st.lists(st.tuples(config_keys, config_values), max_size=6), junk=st.text(max_size=20))
def test_parse_config_raises_only_config_error(lines, junk) -> None:
    text = "\n".join(k if k.startswith("[") else f"{k} = {v}" for k, v in lines) + "\n" + junk
    with contextlib.suppress(ConfigError):
        parse_config(text)


# --- the control socket's JSON, on the real agent ----------------------------------------


@pytest.fixture(scope="module")
def bare_agent() -> Iterator[AgentEnv]:
    """An agent without a vault: unlock answers at once (no passphrase delay)."""
    env = AgentEnv()
    agent = start_agent(env)
    try:
        yield env
    finally:
        alive = agent.alive()
        agent.stop()
        env.cleanup()
        assert alive


@settings(FUZZ, max_examples=150)
@given(
    path=st.sampled_from(
        ["/v1/unlock", "/v1/lock", "/v1/reload", "/v1/status", "/v1/renew/x", "/v1/unlock/x"]
    ),
    body=json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=100),
)
def test_control_json_gets_a_json_answer_and_never_a_server_error(bare_agent, path, body) -> None:
    data = (
        f"POST {path} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    outcome = exchange(bare_agent.control_socket, data, linger=0)
    response = outcome.response
    assert response is not None
    assert response.status < 500, (response.status, response.body)
    doc = json.loads(response.body)
    if response.status >= 400:
        assert doc["error"] and doc["message"], doc


# --- the EST client's inputs ---------------------------------------------------------


@pytest.fixture(scope="module")
def est() -> object:
    return pytest.importorskip("agent.est")


@pytest.fixture(scope="module")
def certs_only(pki: Pki) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

    return pkcs7.serialize_certificates([pki.client.cert, pki.intermediate.cert], Encoding.DER)


@FUZZ
@given(
    edit=edits, cut=st.none() | st.integers(0, 2048), form=st.sampled_from(["der", "b64", "pem"])
)
def test_est_pkcs7_answers_raise_only_enrollment_error(est, certs_only, edit, cut, form) -> None:
    der = _mutate(certs_only, edit)[:cut]
    body = {
        "der": der,
        "b64": base64.encodebytes(der),
        "pem": b"-----BEGIN PKCS7-----\n" + base64.encodebytes(der) + b"-----END PKCS7-----\n",
    }[form]
    with contextlib.suppress(EnrollmentError, IdentityError):
        est.parse_certs_only(body)  # type: ignore[attr-defined]


def test_an_est_answer_with_an_invalid_certificate_version_is_an_enrollment_error(
    est, pki: Pki, bad_version_cert: bytes
) -> None:
    """Found by the property above: InvalidVersion is not a ValueError."""
    from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

    good = pki.client.cert.public_bytes(Encoding.DER)
    bag = pkcs7.serialize_certificates([pki.client.cert], Encoding.DER)
    with pytest.raises(EnrollmentError):
        est.parse_certs_only(bag.replace(good, bad_version_cert))  # type: ignore[attr-defined]


@FUZZ
@given(data=st.binary(max_size=600))
def test_est_bodies_and_requests_of_random_bytes_raise_only_enrollment_error(est, data) -> None:
    for parse in (est.parse_certs_only, est.load_csr, est.decode_body):  # type: ignore[attr-defined]
        with contextlib.suppress(EnrollmentError, IdentityError):
            parse(data)


@FUZZ
@given(text=st.text(max_size=60))
def test_est_subjects_and_sans_raise_only_enrollment_error(est, text) -> None:
    for parse in (est.parse_subject, est.parse_san):  # type: ignore[attr-defined]
        with contextlib.suppress(EnrollmentError, IdentityError):
            parse(text)


# --- the atheris target: a smoke run ------------------------------------------------------

ATHERIS_TARGET = Path(__file__).with_name("fuzz_request_head.py")


def test_the_atheris_request_head_target_runs_clean(tmp_path: Path) -> None:
    """A few thousand runs of the coverage-guided target (longer runs: see its docstring)."""
    pytest.importorskip("atheris", reason="atheris has wheels for Linux x86-64 only")
    proc = subprocess.run(
        [
            sys.executable,
            str(ATHERIS_TARGET),
            "-runs=3000",
            "-seed=1",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(ATHERIS_TARGET.parent.parent), str(ATHERIS_TARGET.parents[2])]
            ),
        },
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done 3000 runs" in proc.stderr, proc.stderr[-2000:]
    record("fuzz: atheris request-head target, 3000 runs", "no fault", None)
