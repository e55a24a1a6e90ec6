"""The audit log: its writer (agent.audit), what the agent and agentctl log, ``agentctl log``.

The writer is tested in-process against real files; the rest runs the real
``mtls-agent`` and ``agentctl`` in a throw-away environment, with curl and
nginx for the requests. The two request tests need the relay to call
``AuditLog.request`` once per answered request.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.agent import AgentEnv, AgentProcess, console_script, start_agent, write_secret_file
from support.clients import curl
from support.nginx import Nginx
from support.pki import P12_PASSWORD, Pki
from support.tools import in_ci, require_tool

from agent.audit import AuditLog, append_event, open_log_file, request_path
from agent.config import parse_config
from agent.errors import AuditLogError, ConfigError, PeerDenied
from agent.peer import Caller, Peer
from agent.vault import Vault
from cli.render import audit_text

PASSPHRASE = "audit tests passphrase"
CHEAP_KDF_N = 2**12
WAIT = 10.0


def entries(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()]


def wait_for_entries(
    path: Path, found: Callable[[list[dict[str, Any]]], bool], timeout: float = WAIT
) -> list[dict[str, Any]]:
    """The log's entries once ``found`` says they are all there (the writer batches)."""
    deadline = time.monotonic() + timeout
    while True:
        got = entries(path)
        if found(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"the audit log never had what was expected: {got}")
        time.sleep(0.02)


def events(got: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in got if e["event"] == kind]


def me() -> Caller:
    return Caller(Peer(os.getpid(), os.getuid(), os.getgid()))


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "log" / "audit.jsonl"


def a_request(audit: AuditLog, **changes: Any) -> None:
    fields: dict[str, Any] = {
        "identity": "work",
        "method": b"GET",
        "host": "api.example.com",
        "port": 443,
        "path": b"/v1/items?token=s3cret",
        "status": 200,
        "bytes_in": 0,
        "bytes_out": 1234,
        "duration": 0.0125,
        "caller": me(),
    }
    audit.request(**{**fields, **changes})


# --- the writer ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "kept"),
    [
        (b"/v1/items?token=s3cret", "/v1/items"),
        (b"/v1/items#frag", "/v1/items"),
        (b"/a%20b?x=1#y", "/a%20b"),
        (b"http://api.example.com/v1/items?token=s3cret", "/v1/items"),
        (b"http://api.example.com?token=s3cret", "/"),
        (b"*", "*"),
        (b"/" + b"a" * 5000, "/" + "a" * 2047),
    ],
)
def test_a_request_path_is_kept_without_its_query_or_fragment(target: bytes, kept: str) -> None:
    assert request_path(target) == kept


def test_a_request_line_has_every_field_and_the_file_is_private(log_path: Path) -> None:
    audit = AuditLog(log_path, max_bytes=1 << 20, keep=2)
    try:
        a_request(audit)
        a_request(
            audit,
            identity=None,
            status=403,
            bytes_out=0,
            error=PeerDenied("No identity admits this process.", reason="uid 7 is not allowed"),
        )
        assert audit.flush()
    finally:
        audit.close()
    ok, denied = entries(log_path)
    assert ok["time"].endswith("Z")
    assert {k: v for k, v in ok.items() if k != "time"} == {
        "event": "request", "identity": "work", "method": "GET", "host": "api.example.com",
        "port": 443, "path": "/v1/items", "status": 200, "bytes_in": 0, "bytes_out": 1234,
        "duration_ms": 12.5, "pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(),
        "exe": os.path.realpath("/proc/self/exe"), "error": None,
    }  # fmt: skip
    assert (denied["error"], denied["reason"]) == ("peer-denied", "uid 7 is not allowed")
    assert b"s3cret" not in log_path.read_bytes()
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(log_path.parent.stat().st_mode) == 0o700


def test_lines_reach_the_file_within_the_flush_interval_without_closing(log_path: Path) -> None:
    audit = AuditLog(log_path, max_bytes=1 << 20, keep=2, flush_interval=0.1)
    try:
        start = time.monotonic()
        a_request(audit)
        wait_for_entries(log_path, lambda got: len(got) == 1, timeout=2)
        assert time.monotonic() - start < 1.0
    finally:
        audit.close()


def test_a_request_is_queued_by_the_caller_and_written_by_the_writer(log_path: Path) -> None:
    """The data plane's call never writes: the file stays untouched until the
    writer's turn, however many lines wait."""
    audit = AuditLog(log_path, max_bytes=1 << 30, keep=2, flush_interval=60, batch_lines=10**6)
    caller = me()
    try:
        for _ in range(10_000):
            audit.request(
                "work", b"GET", "api.example.com", 443, b"/v1/items", 200, 0, 100, 0.001, caller
            )
        assert log_path.stat().st_size == 0
        assert audit.flush()
    finally:
        audit.close()
    assert len(entries(log_path)) == 10_000


def test_rotation_keeps_the_newest_files_all_private(log_path: Path) -> None:
    audit = AuditLog(log_path, max_bytes=2000, keep=2)
    try:
        for n in range(12):
            audit.event("marker", None, n=n, padding="x" * 300)
            assert audit.flush()
    finally:
        audit.close()
    files = sorted(log_path.parent.iterdir())
    assert [f.name for f in files] == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    for f in files:
        assert f.stat().st_size <= 2000
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    kept = [e["n"] for f in reversed(files) for e in entries(f)]
    assert kept == list(range(12 - len(kept), 12))  # the newest, in order, none repeated


def test_a_batch_bigger_than_the_room_left_is_split_across_rotations(log_path: Path) -> None:
    """Lines that arrive together (one writer batch) still rotate at max_bytes."""
    audit = AuditLog(log_path, max_bytes=2000, keep=20)
    try:
        for n in range(30):  # queued together, written as one batch
            audit.event("marker", None, n=n, padding="x" * 100)
        assert audit.flush()
        audit.event("huge", None, padding="y" * 3000)  # bigger than a whole file
        audit.event("after", None)
        assert audit.flush()
    finally:
        audit.close()
    files = sorted(
        log_path.parent.iterdir(), key=lambda f: -int(f.name[len("audit.jsonl.") :] or 0)
    )
    sizes = [f.stat().st_size for f in files]
    got = [e for f in files for e in entries(f)]
    assert [e["n"] for e in got if e["event"] == "marker"] == list(range(30))
    assert [e["event"] for e in got[30:]] == ["huge", "after"]
    assert len(files) > 3
    for f, size in zip(files, sizes, strict=True):
        assert size <= 2000 or [e["event"] for e in entries(f)] == ["huge"], (f.name, size)


def test_the_log_is_reopened_when_it_was_moved_away(log_path: Path) -> None:
    audit = AuditLog(log_path, max_bytes=1 << 20, keep=2)
    try:
        audit.event("before", None)
        assert audit.flush()
        moved = log_path.with_name("moved.jsonl")
        os.replace(log_path, moved)
        audit.event("after", None)
        assert audit.flush()
    finally:
        audit.close()
    assert [e["event"] for e in entries(moved)] == ["before"]
    assert [e["event"] for e in entries(log_path)] == ["after"]
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600


def test_a_full_queue_drops_and_counts_lines_instead_of_growing(log_path: Path) -> None:
    audit = AuditLog(log_path, max_bytes=1 << 20, keep=2, max_pending=10, batch_lines=10**6)
    try:
        for n in range(1000):
            audit.event("burst", None, n=n)
        assert audit.flush()
    finally:
        audit.close()
    got = entries(log_path)
    written = events(got, "burst")
    dropped = sum(e["lines"] for e in events(got, "audit-dropped"))
    assert 0 < len(written) < 1000
    assert len(written) + dropped == 1000


def test_the_log_refuses_a_symlink(log_path: Path, tmp_path: Path) -> None:
    log_path.parent.mkdir(parents=True)
    target = tmp_path / "elsewhere"
    target.write_text("")
    log_path.symlink_to(target)
    with pytest.raises(AuditLogError, match=str(log_path)):
        open_log_file(log_path)


def test_the_log_refuses_a_file_of_another_user(log_path: Path) -> None:
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail("CI=true but not root: cannot give a file to another user")
        pytest.skip("needs root to give a file to another user")
    log_path.parent.mkdir(parents=True)
    log_path.write_text("")
    os.chown(log_path, 65534, 65534)
    with pytest.raises(AuditLogError, match="belongs to another user"):
        open_log_file(log_path)


def test_agentctl_events_are_appended_by_the_cli_process(log_path: Path) -> None:
    append_event(log_path, "remove", identity="work")
    [entry] = entries(log_path)
    assert entry["event"] == "remove" and entry["identity"] == "work"
    assert (entry["pid"], entry["uid"]) == (os.getpid(), os.getuid())


def test_config_sets_the_rotation_and_refuses_nonsense() -> None:
    config = parse_config("[audit]\nmax_bytes = 4096\nkeep = 3\n")
    assert (config.audit_max_bytes, config.audit_keep) == (4096, 3)
    assert parse_config("").audit_max_bytes == 10 * 1024 * 1024
    for bad in ("[audit]\nmax_bytes = 0\n", "[audit]\nkeep = -1\n", "[audit]\nsize = 5\n"):
        with pytest.raises(ConfigError):
            parse_config(bad)


# --- what the agent and agentctl log -----------------------------------------------------


@pytest.fixture
def vault(agent_env: AgentEnv) -> Vault:
    v = Vault(agent_env.vault_dir)
    v.create(PASSPHRASE, kdf_n=CHEAP_KDF_N)
    return v


def import_identity(env: AgentEnv, pki: Pki, name: str = "work", *extra: str) -> None:
    password = write_secret_file(env.root, P12_PASSWORD, f"{name}-p12-password")
    env.agentctl(
        "import", name, pki.client_p12(), "--host", "localhost", "--ca", pki.root_pem,
        "--p12-password-file", password, *extra,
    )  # fmt: skip


def unlock(env: AgentEnv, passphrase: str = PASSPHRASE, check: bool = True) -> None:
    secret = env.passphrase_file(passphrase, f"pass-{abs(hash(passphrase))}")
    env.agentctl("unlock", "--passphrase-file", secret, check=check)


def test_unlock_failed_unlock_lock_start_and_stop_are_audited(
    agent_env: AgentEnv, vault: Vault
) -> None:
    agent = start_agent(agent_env)
    try:
        unlock(agent_env, "not the passphrase", check=False)
        unlock(agent_env)
        agent_env.agentctl("lock")
    finally:
        agent.stop()
    got = entries(agent_env.audit_log)
    assert [e["event"] for e in got] == ["start", "unlock-failed", "unlock", "lock", "stop"]
    start, failed, unlocked, locked, stop = got
    assert start["pid"] == agent.pid == stop["pid"]
    assert (failed["failures"], failed["delay"]) == (1, 0.1)
    assert unlocked["loaded"] == [] and locked["reason"] == "agentctl"
    for entry in (failed, unlocked, locked):  # the caller: agentctl, over the control socket
        assert entry["uid"] == os.getuid() and entry["pid"] != agent.pid
        assert entry["exe"] and "python" in os.path.basename(entry["exe"])
    assert PASSPHRASE not in agent_env.audit_log.read_text()
    assert "not the passphrase" not in agent_env.audit_log.read_text()
    assert stat.S_IMODE(agent_env.audit_log.stat().st_mode) == 0o600


def test_import_rule_changes_and_removal_are_audited_without_an_agent(
    agent_env: AgentEnv, vault: Vault, pki: Pki
) -> None:
    import_identity(agent_env, pki, "work", "--allow-uid", str(os.getuid()))
    agent_env.agentctl("policy", "work", "--allow-exe", "/usr/bin/curl")
    agent_env.agentctl("remove", "work")
    imported, policy, removed = entries(agent_env.audit_log)
    assert imported["event"] == "import" and imported["identity"] == "work"
    assert imported["hosts"] == ["localhost"] and imported["source"] == "pkcs12-file"
    assert imported["subject"] == "CN=mtls-agent test client,O=mtls-agent tests"
    assert imported["callers"]["uids"] == [os.getuid()]
    assert policy["event"] == "policy" and policy["callers"]["exes"] == ["/usr/bin/curl"]
    assert removed["event"] == "remove" and removed["identity"] == "work"
    assert P12_PASSWORD not in agent_env.audit_log.read_text()


def test_agentctl_log_prints_text_json_and_the_last_entries(
    agent_env: AgentEnv, log_path: Path
) -> None:
    assert "no audit log yet" in agent_env.agentctl("log").stderr
    for name in ("first", "second", "third"):
        append_event(agent_env.audit_log, "remove", identity=name)
    text = agent_env.agentctl("log").stdout.splitlines()
    assert len(text) == 3 and all(" UTC  remove  identity=" in line for line in text)
    assert text[2].split("  remove  ")[1].startswith("identity=third")
    as_json = agent_env.agentctl("log", "--json", "-n", "2").stdout.splitlines()
    assert [json.loads(line)["identity"] for line in as_json] == ["second", "third"]
    assert agent_env.agentctl("log", "-n", "0").stdout == ""


def _read_lines(proc: subprocess.Popen[bytes], count: int, timeout: float = WAIT) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    buffer = b""
    deadline = time.monotonic() + timeout
    while len(lines) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"agentctl log --follow printed only {lines}"
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            piece = os.read(proc.stdout.fileno(), 65536)
            assert piece, f"agentctl log --follow ended after {lines}"
            buffer += piece
            *done, buffer = buffer.split(b"\n")
            lines += [line.decode() for line in done]
    return lines


@pytest.fixture
def follower(agent_env: AgentEnv) -> Iterator[subprocess.Popen[bytes]]:
    """``agentctl log --follow --json`` running in ``agent_env``; stopped afterwards."""
    append_event(agent_env.audit_log, "remove", identity="old")
    proc = subprocess.Popen(
        [*console_script("agentctl", "cli"), "log", "--follow", "--json"],
        env=agent_env.env,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_agentctl_log_follow_prints_new_entries_across_rotations(
    agent_env: AgentEnv, follower: subprocess.Popen[bytes]
) -> None:
    assert json.loads(_read_lines(follower, 1)[0])["identity"] == "old"
    audit = AuditLog(agent_env.audit_log, max_bytes=600, keep=3)
    try:
        for n in range(6):  # about 250 bytes each: the file is rotated every other line
            audit.event("marker", None, n=n, padding="x" * 150)
            assert audit.flush()
            assert json.loads(_read_lines(follower, 1)[0])["n"] == n
    finally:
        audit.close()
    assert agent_env.audit_log.with_name("audit.jsonl.2").exists()
    assert follower.poll() is None


# --- per request (the relay calls AuditLog.request) --------------------------------------


@pytest.fixture
def serving(agent_env: AgentEnv, vault: Vault, pki: Pki, nginx: Nginx) -> Iterator[AgentProcess]:
    """An unlocked agent with the identity 'work' for localhost."""
    import_identity(agent_env, pki)
    agent = start_agent(agent_env)
    try:
        unlock(agent_env)
        yield agent
    finally:
        agent.stop()


def test_each_forwarded_request_is_audited_with_its_caller(
    agent_env: AgentEnv, serving: AgentProcess, nginx: Nginx
) -> None:
    curl_exe = os.path.realpath(require_tool("curl"))
    got = curl(agent_env.proxy_socket, f"http://{nginx.host_header}/echo/items?page=2")
    assert got.status == 200
    posted = curl(
        agent_env.proxy_socket, f"http://{nginx.host_header}/echo/up", "--data-binary", "x" * 100
    )
    assert posted.status == 200
    got_entries = wait_for_entries(agent_env.audit_log, lambda es: len(events(es, "request")) >= 2)
    first, second = events(got_entries, "request")
    assert (first["identity"], first["method"], first["host"]) == ("work", "GET", "localhost")
    assert (first["port"], first["path"], first["status"]) == (nginx.port, "/echo/items", 200)
    assert (first["bytes_in"], first["bytes_out"]) == (0, len(b"ok\n"))
    assert first["duration_ms"] > 0 and first["error"] is None
    assert (first["uid"], first["gid"], first["exe"]) == (os.getuid(), os.getgid(), curl_exe)
    assert isinstance(first["pid"], int) and first["pid"] != serving.pid
    assert (second["method"], second["path"], second["bytes_in"]) == ("POST", "/echo/up", 100)


def _raw_answer(sock: Path, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(WAIT)
        conn.connect(str(sock))
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_requests_refused_in_their_head_are_audited_too(
    agent_env: AgentEnv, serving: AgentProcess, nginx: Nginx
) -> None:
    """Smuggling attempts and oversized heads are answered by the agent
    before any exchange exists: they still leave a line."""
    host = nginx.host_header
    refused = {
        "garbage": (b"HELLO THERE\r\n\r\n", 400),
        "smuggling": (
            b"POST /s?token=q-secret HTTP/1.1\r\nHost: %s\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % host.encode(),
            400,
        ),
        "long-line": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        "big-head": (
            b"GET /big HTTP/1.1\r\nHost: %s\r\n" % host.encode()
            + b"X-Fill: %s\r\n" % (b"f" * 8000) * 9
            + b"\r\n",
            431,
        ),
        "userinfo": (b"GET /who?q-secret HTTP/1.1\r\nHost: user@localhost\r\n\r\n", 400),
    }
    for request, status in refused.values():
        answer = _raw_answer(agent_env.proxy_socket, request)
        assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    got = wait_for_entries(agent_env.audit_log, lambda es: len(events(es, "request")) >= 5)
    garbage, smuggling, long_line, big_head, userinfo = events(got, "request")
    assert (garbage["status"], garbage["error"], garbage["method"]) == (400, "bad-request", None)
    assert (smuggling["status"], smuggling["method"], smuggling["path"]) == (400, "POST", "/s")
    assert (smuggling["host"], smuggling["port"]) == ("localhost", nginx.port)
    assert (long_line["status"], long_line["error"]) == (414, "bad-request")
    assert (big_head["status"], big_head["path"], big_head["host"]) == (431, "/big", "localhost")
    assert (userinfo["status"], userinfo["path"], userinfo["host"]) == (400, "/who", None)
    for line in (garbage, smuggling, long_line, big_head, userinfo):
        assert line["identity"] is None and line["uid"] == os.getuid()
    assert b"q-secret" not in agent_env.audit_log.read_bytes()


def test_the_audit_log_never_holds_a_query_a_header_or_a_body(
    agent_env: AgentEnv, serving: AgentProcess, nginx: Nginx
) -> None:
    secrets = {
        "query": "q-secret-7f3a91",
        "bearer": "bearer-secret-c0ffee",
        "cookie": "cookie-secret-5e55ion",
        "body": "body-secret-b0d7",
    }
    mark = nginx.mark()
    got = curl(
        agent_env.proxy_socket,
        f"http://{nginx.host_header}/echo/private?token={secrets['query']}",
        "-H", f"Authorization: Bearer {secrets['bearer']}",
        "-H", f"Cookie: session={secrets['cookie']}",
        "--data-binary", f"password={secrets['body']}",
    )  # fmt: skip
    assert got.status == 200
    [seen] = nginx.access_log(mark, wait_for=1)
    assert secrets["query"] in seen["request"]  # it did go upstream
    wait_for_entries(
        agent_env.audit_log,
        lambda es: any(e.get("path") == "/echo/private" for e in events(es, "request")),
    )
    serving.stop()  # everything flushed, stderr complete
    written = b"".join(p.read_bytes() for p in agent_env.audit_log.parent.iterdir())
    written += serving.stderr_path.read_bytes()
    for what, secret in secrets.items():
        assert secret.encode() not in written, f"the {what} reached a log"


def test_a_request_entry_reads_as_one_line_of_text() -> None:
    entry = {
        "time": "2026-11-27T06:07:00.123Z", "event": "request", "identity": None,
        "method": "GET", "host": "::1", "port": 8443, "path": "/v1/items", "status": 403,
        "bytes_in": 0, "bytes_out": 2048, "duration_ms": 1.5, "pid": 42, "uid": 1000,
        "gid": 1000, "exe": "/usr/bin/curl", "error": "peer-denied",
        "reason": "identity 'work': uid 1000 is not allowed (allow-uid 0)",
    }  # fmt: skip
    assert audit_text(entry) == (
        "2026-11-27 06:07:00 UTC  request  -  GET [::1]:8443/v1/items -> 403 peer-denied "
        "(identity 'work': uid 1000 is not allowed (allow-uid 0))  in 0 B, out 2.0 KiB, "
        "1.5 ms  pid 42 uid 1000 /usr/bin/curl"
    )
    garbage = {**entry, "method": None, "host": None, "port": None, "path": None}
    garbage.update(status=400, error="bad-request", reason=None)
    assert "request  -  - - -> 400 bad-request  in" in audit_text(garbage)  # not "None None"


def test_request_lines_are_valid_json_whatever_the_strings_hold() -> None:
    """The request line is built from a template: every string must still be escaped."""
    from agent.audit import _RequestEncoder
    from agent.errors import PeerDenied

    class Odd:
        pid, uid, gid = 7, 1000, 1000
        exe = '/opt/we"ird\\\\path/\u00e9\n'

    encode = _RequestEncoder()
    error = PeerDenied(reason='rule "exe" failed\n')
    line = encode(
        1700000000.25,
        Odd(),
        *("work", b"GET", "h\u00f6st", None, b'/a"b\\c\x01?token=secret', 403, 0, 0, 0.5, error),
    )
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    doc = json.loads(line)
    assert doc["time"] == "2023-11-14T22:13:20.250Z"
    assert doc["path"] == '/a"b\\c\x01'
    assert doc["exe"] == Odd.exe
    assert doc["host"] == "h\u00f6st" and doc["port"] is None
    assert (doc["status"], doc["error"]) == (403, "peer-denied")
    assert doc["reason"] == 'rule "exe" failed\n'
    assert b"secret" not in line


def test_request_lines_stay_right_across_the_encoders_kept_fragments() -> None:
    """Routes, callers and paths repeat, so their encoded forms are kept: a line
    must still carry its own, when the caches fill up and when a caller's
    program becomes known (an attested executable replaces the first look)."""
    from agent.audit import FRAGMENTS_CACHED, _RequestEncoder

    class Proc:
        def __init__(self, pid: int, exe: str | None) -> None:
            self.pid, self.uid, self.gid, self.exe = pid, 1000, 1000, exe

    encode = _RequestEncoder()
    caller = Proc(1, None)
    expected = []
    lines = []
    for i in range(FRAGMENTS_CACHED * 2 + 3):
        if i == FRAGMENTS_CACHED:
            caller.exe = "/usr/bin/curl"  # attested later on the same connection
        who = caller if i % 3 else Proc(i, f"/bin/p{i % 5}")
        path = f"/item/{i % (FRAGMENTS_CACHED + 7)}?q={i}".encode()
        method = (b"GET", "POST", b"HEAD")[i % 3]
        fields = (
            f"id{i % 4}",
            method,
            f"h{i % 11}.example",
            443 + i % 2,
            path,
            200,
            i,
            2 * i,
            0.001,
            None,
        )
        lines.append(json.loads(encode(1700000000.0 + i, who, *fields)))
        expected.append(
            {
                "identity": f"id{i % 4}",
                "method": method.decode() if isinstance(method, bytes) else method,
                "host": f"h{i % 11}.example",
                "port": 443 + i % 2,
                "path": f"/item/{i % (FRAGMENTS_CACHED + 7)}",
                "bytes_in": i,
                "bytes_out": 2 * i,
                "pid": who.pid,
                "exe": who.exe,
            }
        )
    for line, want in zip(lines, expected, strict=True):
        assert {key: line[key] for key in want} == want
