"""Renewal of EST identities: when it runs, how it fails, and the swap under load.

Two levels. The scheduler itself runs here, in-process, with a clock the
test controls, a real keychain and vault, and the real test EST server:
due times, exponential backoff, clock jumps and the wait for an unlock are
asserted exactly. End to end, the real agent renews short-lived
certificates (seconds) from the same EST server while requests keep flowing
to a real nginx, which must see the new certificate's serial.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import itertools
import json
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from support.agent import AgentEnv, AgentProcess, start_agent, write_secret_file
from support.clients import curl
from support.est_server import EstServer
from support.nginx import Nginx
from support.pki import P12_PASSWORD, Pki

from agent.enroll import EstEnrollment, enroll_est
from agent.errors import EnrollmentError
from agent.identity import Identity
from agent.keychain import Keychain
from agent.policy import CallerRules
from agent.renewal import JITTER, RENEW_AT, Renewer, renewal_due
from agent.vault import Vault
from cli.control_client import ControlClient

PASSPHRASE = "correct horse battery staple"
CHEAP_KDF_N = 2**12
DEADLINE = 10.0
POLL = 0.02


@pytest.fixture
def est(pki: Pki) -> Iterator[EstServer]:
    server = EstServer(pki).start()
    try:
        yield server
    finally:
        server.stop()


def csr_of(body: bytes) -> x509.CertificateSigningRequest:
    return x509.load_der_x509_csr(base64.b64decode(b"".join(body.split())))


# --- the scheduler, in-process, with a clock the test controls -----------------------------


class Clock:
    """Wall-clock time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    vault: Vault
    keychain: Keychain
    clock: Clock
    est: EstServer
    identity: Identity

    def renewer(self, **settings: float) -> Renewer:
        options = {"check_interval": 60.0, "retry_initial": 30.0, "retry_max": 240.0, **settings}
        return Renewer(self.keychain, self.vault, clock=self.clock, rng=random.Random(7), **options)

    def past_due(self) -> float:
        """A moment after the renewal is due, whatever the jitter drew."""
        return renewal_due(self.identity, JITTER) + 1


async def enrolled(
    folder: Path, est: EstServer, **order: object
) -> tuple[Vault, Keychain, Identity]:
    """A vault with the EST identity 'dev' enrolled for real, in an unlocked keychain."""
    vault = Vault(folder / "vault")
    vault.create(PASSPHRASE, kdf_n=CHEAP_KDF_N)
    trust = est.pki.root_pem.read_bytes()
    identity = await enroll_est(
        vault, EstEnrollment("dev", est.url, ("localhost",), server_ca_pem=trust, **order)
    )
    scratch = folder / "run"
    scratch.mkdir(mode=0o700)
    keychain = Keychain(vault, scratch)
    await keychain.unlock(PASSPHRASE)
    return vault, keychain, identity


@pytest.fixture
async def world(tmp_path: Path, est: EstServer) -> AsyncIterator[World]:
    """An EST identity 'dev' (30 days) in an unlocked keychain, and a test clock."""
    vault, keychain, identity = await enrolled(tmp_path, est)
    yield World(vault, keychain, Clock(), est, identity)
    keychain.lock()


async def test_renewal_is_due_at_two_thirds_of_the_lifetime_within_the_jitter(
    world: World,
) -> None:
    start = world.identity.not_before.timestamp()
    lifetime = world.identity.not_after.timestamp() - start
    assert renewal_due(world.identity) == pytest.approx(start + lifetime * RENEW_AT)
    dues = set()
    for seed in range(20):
        renewer = Renewer(world.keychain, world.vault, check_interval=60, retry_initial=30,
                          retry_max=240, rng=random.Random(seed))  # fmt: skip
        due = dt.datetime.fromisoformat(renewer.report()["dev"]["due"]).timestamp()
        assert start + lifetime * (RENEW_AT - JITTER) - 0.01 <= due
        assert due <= start + lifetime * (RENEW_AT + JITTER) + 0.01
        dues.add(round(due))
    assert len(dues) > 10  # spread, not one instant for every agent


async def test_nothing_happens_before_the_renewal_is_due(world: World) -> None:
    renewer = world.renewer()
    world.clock.now = renewal_due(world.identity, -JITTER) - 1
    await renewer.tick()
    assert world.est.enroll_requests("simplereenroll") == []
    assert renewer.report()["dev"]["state"] == "scheduled"


async def test_renewal_swaps_in_a_fresh_key_authenticated_by_the_old_identity(
    world: World,
) -> None:
    renewer = world.renewer()
    old = world.keychain.route("localhost", 443)
    world.clock.now = world.past_due()
    await renewer.tick()

    new = world.keychain.route("localhost", 443)
    assert new is not old and old.retired and not new.retired
    [reenroll] = world.est.enroll_requests("simplereenroll")
    assert reenroll.client_cert == old.identity.leaf  # mTLS with the current identity
    csr = csr_of(reenroll.body)
    assert csr.subject == old.identity.leaf.subject
    assert csr.public_key() != old.identity.leaf.public_key()  # a fresh key
    assert new.identity.leaf.public_key() == csr.public_key()
    assert new.identity.leaf == world.est.issued[-1]
    assert Identity.from_metadata("dev", world.vault.read_metadata("dev")) == new.identity
    report = renewer.report()["dev"]
    assert report["serial"] == new.identity.serial and report["state"] == "scheduled"
    assert report["last_renewed"] is not None and report["failures"] == 0


async def test_a_202_during_renewal_is_asked_again_with_the_same_request(world: World) -> None:
    world.est.pending = 1
    renewer = world.renewer()
    world.clock.now = world.past_due()
    await renewer.tick()
    first, second = world.est.enroll_requests("simplereenroll")
    assert first.body == second.body
    assert world.keychain.route("localhost", 443).identity.leaf == world.est.issued[-1]


async def test_failed_renewals_back_off_exponentially_and_the_old_identity_keeps_serving(
    world: World,
) -> None:
    world.est.answer = "unavailable"
    renewer = world.renewer(retry_initial=30, retry_max=240)
    old = world.keychain.route("localhost", 443)
    world.clock.now = world.past_due()
    delays = []
    for failures in range(1, 7):
        await renewer.tick()
        report = renewer.report()["dev"]
        assert report["failures"] == failures and report["state"] == "failing"
        assert "HTTP 503" in report["last_error"]
        delays.append(report["retry_delay_seconds"])
        next_try = dt.datetime.fromisoformat(report["next_renewal"]).timestamp()
        assert next_try == pytest.approx(world.clock.now + delays[-1], abs=0.01)
        asked = len(world.est.requests)
        world.clock.now = next_try - 0.5
        await renewer.tick()  # not yet: no tight loop
        assert len(world.est.requests) == asked
        world.clock.now = next_try
    assert delays == [30, 60, 120, 240, 240, 240]
    assert world.keychain.route("localhost", 443) is old and not old.retired


async def test_a_certificate_issued_already_due_is_not_renewed_back_to_back(
    world: World,
) -> None:
    world.est.backdate = dt.timedelta(days=29)  # every new one is past two thirds at once
    renewer = world.renewer(retry_initial=30)
    world.clock.now = world.past_due()
    await renewer.tick()
    await renewer.tick()
    assert len(world.est.issued) == 2  # the enrollment's and one renewal
    report = renewer.report()["dev"]
    assert moment(report["next_renewal"]) == pytest.approx(world.clock.now + 30, abs=0.01)
    assert moment(report["due"]) < world.clock.now


async def test_a_clock_jump_past_the_due_time_renews_at_the_next_check(world: World) -> None:
    world.est.lifetimes.append(dt.timedelta(days=365))  # the renewed one is not due at once
    renewer = world.renewer(check_interval=0.05)
    renewer.start()
    try:
        await asyncio.sleep(0.3)  # several checks while nothing is due
        assert world.est.enroll_requests("simplereenroll") == []
        world.clock.now = world.past_due()  # a suspend, or the clock set forward
        jumped = time.monotonic()
        while world.keychain.route("localhost", 443).identity.leaf == world.identity.leaf:
            assert time.monotonic() - jumped < DEADLINE, "no renewal after the jump"
            await asyncio.sleep(POLL)
    finally:
        await renewer.stop()
    assert len(world.est.enroll_requests("simplereenroll")) == 1


async def test_renewal_waits_while_locked_and_runs_after_unlock(world: World) -> None:
    renewer = world.renewer()
    world.keychain.lock()
    world.clock.now = world.past_due()
    await renewer.tick()
    assert world.est.enroll_requests("simplereenroll") == []
    assert renewer.report()["dev"]["state"] == "waiting-for-unlock"
    await world.keychain.unlock(PASSPHRASE)
    await renewer.tick()
    assert len(world.est.enroll_requests("simplereenroll")) == 1
    assert world.keychain.route("localhost", 443).identity.leaf == world.est.issued[-1]


async def test_renewal_keeps_hosts_pins_trust_and_caller_rules(
    tmp_path: Path, pki: Pki, est: EstServer
) -> None:
    upstream_pin = "sha256//" + pki.server.spki_sha256
    callers = CallerRules(uids=(os.getuid(),))
    vault, keychain, old = await enrolled(
        tmp_path, est, upstream_pins=(upstream_pin,), min_tls="1.3", callers=callers
    )
    renewer = Renewer(keychain, vault, check_interval=60, retry_initial=30, retry_max=240)
    try:
        new = await renewer.renew_now("dev")
    finally:
        keychain.lock()
    assert new.leaf != old.leaf
    assert (new.hosts, new.pins, new.min_tls, new.callers) == (
        old.hosts, old.pins, old.min_tls, old.callers,
    )  # fmt: skip
    assert new.ca_pem == old.ca_pem and new.source == old.source


async def test_renewal_checks_the_est_servers_pin_before_sending_anything(
    tmp_path: Path, pki: Pki, est: EstServer
) -> None:
    pin = "sha256//" + pki.server.spki_sha256
    vault, keychain, _ = await enrolled(tmp_path, est, server_pins=(pin,))
    renewer = Renewer(keychain, vault, check_interval=60, retry_initial=30, retry_max=240)
    try:
        renewed = await renewer.renew_now("dev")  # the right pin: renewed
        assert renewed.leaf == est.issued[-1]

        metadata = vault.read_metadata("dev")
        metadata["source"]["server_pins"] = ["sha256//" + pki.other_server.spki_sha256]
        vault.update_metadata("dev", metadata)
        await keychain.reload()
        asked = len(est.requests)
        with pytest.raises(EnrollmentError, match="matches none of the given pins"):
            await renewer.renew_now("dev")
        assert len(est.requests) == asked  # connected, refused, sent nothing
    finally:
        keychain.lock()


# --- the real agent -------------------------------------------------------------------------


def start_unlocked(env: AgentEnv, config: str | None = None) -> AgentProcess:
    if config:
        env.write_config(config)
    agent = start_agent(env)
    env.agentctl("unlock", "--passphrase-file", env.passphrase_file(PASSPHRASE))
    return agent


@pytest.fixture
def env(agent_env: AgentEnv) -> AgentEnv:
    Vault(agent_env.vault_dir).create(PASSPHRASE, kdf_n=CHEAP_KDF_N)
    return agent_env


def issue_due_at_once(server: EstServer) -> None:
    """Two-minute certificates that began 100 s ago: past two thirds of their
    lifetime (renewal due at once, whatever the jitter), valid 20 s more;
    the renewed ones last an hour."""
    server.lifetimes = [dt.timedelta(seconds=120), dt.timedelta(hours=1)]
    server.backdate = dt.timedelta(seconds=100)


def enroll(env: AgentEnv, server: EstServer, name: str = "dev") -> None:
    env.agentctl(
        "enroll", name, "--est", server.url, "--host", "localhost", "--ca", server.pki.root_pem
    )


def status(env: AgentEnv) -> dict:
    """The agent's status as ``agentctl status --json`` gets it, without the
    cost of a process per poll (retries 0.2 s apart must not be missed)."""
    return ControlClient(env.control_socket).get("/v1/status")


def moment(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def wait_for(predicate, what: str, timeout: float = DEADLINE):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL)


async def test_renewal_under_continuous_requests_drops_nothing_and_nginx_sees_the_new_serial(
    env: AgentEnv, est: EstServer, nginx: Nginx
) -> None:
    est.lifetimes = [dt.timedelta(seconds=6), dt.timedelta(hours=1)]  # renews at about 4 s
    est.backdate = dt.timedelta(0)
    agent = start_unlocked(env, 'renewal_check_interval = "0.2s"\n')
    try:
        mark = nginx.mark()
        await asyncio.to_thread(enroll, env, est)  # the running agent loads it at once
        old_serial = format(est.issued[0].serial_number, "X")
        results: list[tuple[int, str | None, str | None]] = []
        stop = asyncio.Event()
        load = asyncio.create_task(keep_requesting(env, nginx, results, stop))
        started = time.monotonic()
        while not est.issued[1:] or len(served_by(results, est.issued[1])) < 50:
            assert not load.done(), load
            assert time.monotonic() - started < 15, f"no renewal seen: {results[-3:]}"
            await asyncio.sleep(0.05)
        stop.set()
        await load
    finally:
        agent.stop()

    failures = [r for r in results if r[0] != 200]
    assert failures == [], failures[:5]
    new = est.issued[1]
    assert len(served_by(results, est.issued[0])) > 50  # traffic ran before the swap...
    assert results[-1][1] == hex_serial(new)  # ...and after it, on the new certificate
    serials = [r[1] for r in results]
    swap = serials.index(hex_serial(new))
    assert set(serials[:swap]) == {hex_serial(est.issued[0])}
    logged = {e["client_serial"] for e in nginx.access_log(mark, wait_for=len(results))}
    assert hex_serial(new) in logged and old_serial.zfill(len(hex_serial(est.issued[0]))) in logged
    [reenroll] = est.enroll_requests("simplereenroll")
    assert reenroll.client_cert == est.issued[0]


def hex_serial(cert: x509.Certificate) -> str:
    digits = format(cert.serial_number, "X")
    return digits.zfill(len(digits) + len(digits) % 2)


def served_by(results: list[tuple[int, str | None, str | None]], cert: x509.Certificate) -> list:
    return [r for r in results if r[1] == hex_serial(cert)]


async def keep_requesting(
    env: AgentEnv,
    nginx: Nginx,
    results: list[tuple[int, str | None, str | None]],
    stop: asyncio.Event,
    clients: int = 4,
) -> None:
    """Requests through the agent, back to back on keep-alive connections."""
    connector = aiohttp.UnixConnector(path=str(env.proxy_socket), limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            while not stop.is_set():
                try:
                    async with session.get(f"http://{nginx.host_header}/echo") as response:
                        await response.read()
                        results.append(
                            (
                                response.status,
                                response.headers.get("X-Client-Serial"),
                                response.headers.get("Mtls-Agent-Error"),
                            )
                        )
                except aiohttp.ClientError as exc:
                    results.append((0, None, repr(exc)))

        await asyncio.gather(*(client() for _ in range(clients)))


def test_failed_renewal_backs_off_keeps_serving_and_status_shows_it(
    env: AgentEnv, est: EstServer, nginx: Nginx
) -> None:
    issue_due_at_once(est)
    enroll(env, est)
    est.stop()  # the EST server is down before the agent ever tries
    config = (
        'renewal_check_interval = "0.2s"\n'
        'renewal_retry_initial = "0.2s"\n'
        'renewal_retry_max = "1s"\n'
    )
    agent = start_unlocked(env, config)
    try:
        seen: dict[int, dict] = {}

        def three_failures() -> bool:
            report = status(env)["renewal"]["dev"]
            seen.setdefault(report["failures"], report)
            return report["failures"] >= 3

        wait_for(three_failures, "three failed renewals")
        delays = [seen[n]["retry_delay_seconds"] for n in (1, 2, 3)]
        assert delays == [0.2, 0.4, 0.8]
        attempts = [moment(seen[n]["last_attempt"]) for n in (1, 2, 3)]
        gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
        assert gaps[0] >= 0.2 - 0.01 and gaps[1] >= 0.4 - 0.01 and gaps[1] > gaps[0]
        assert "cannot connect" in seen[3]["last_error"]

        answer = curl(env.proxy_socket, f"http://{nginx.host_header}/echo")
        assert answer.status == 200, answer.body  # the old identity still serves
        assert answer.header("X-Client-Serial") == hex_serial(est.issued[0])
        text = env.agentctl("status").stdout
        assert "renewal:\n  dev: failing (" in text and "cannot connect" in text

        est.start()  # back, on the same port: the next retry succeeds
        wait_for(lambda: status(env)["renewal"]["dev"]["serial"] != hex_serial(est.issued[0]),
                 "the renewal once the server is back")  # fmt: skip
        answer = curl(env.proxy_socket, f"http://{nginx.host_header}/echo")
        assert answer.header("X-Client-Serial") == hex_serial(est.issued[1])
    finally:
        agent.stop()
    assert "renewal of dev failed (1 in a row)" in agent.stderr_text()


def test_locked_agent_renews_right_after_unlock(env: AgentEnv, est: EstServer) -> None:
    issue_due_at_once(est)
    enroll(env, est)
    agent = start_agent(env)  # locked; checks only every 60 s by default
    try:
        wait_for(
            lambda: status(env)["renewal"]["dev"]["state"] == "waiting-for-unlock",
            "the renewal to wait for the unlock",
        )
        assert "dev: due since" in env.agentctl("status").stdout
        assert est.enroll_requests("simplereenroll") == []
        env.agentctl("unlock", "--passphrase-file", env.passphrase_file(PASSPHRASE))
        wait_for(lambda: len(est.issued) == 2, "the renewal after unlock", timeout=5)
        wait_for(lambda: status(env)["renewal"]["dev"]["serial"] == hex_serial(est.issued[1]),
                 "the new identity")  # fmt: skip
    finally:
        agent.stop()


def test_renew_command_renews_now_and_prints_the_new_expiry(
    env: AgentEnv, est: EstServer, pki: Pki, nginx: Nginx
) -> None:
    agent = start_unlocked(env)
    try:
        enroll(env, est)
        result = env.agentctl("renew", "dev")
        new = est.issued[-1]
        assert len(est.issued) == 2
        assert result.stdout == (
            f"renewed dev: serial {hex_serial(new)}, valid until "
            f"{new.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC\n"
        )
        answer = curl(env.proxy_socket, f"http://{nginx.host_header}/echo")
        assert answer.header("X-Client-Serial") == hex_serial(new)
        rows = json.loads(env.agentctl("list", "--json").stdout)
        assert rows[0]["serial"] == hex_serial(new) and rows[0]["next_renewal"]
        again = json.loads(env.agentctl("renew", "dev", "--json").stdout)
        assert again["serial"] == hex_serial(est.issued[-1]) != hex_serial(new)
        assert again.keys() == rows[0].keys()  # what list --json says of an identity
        assert again["loaded"] is True and again["source_url"] == rows[0]["source_url"]

        password = write_secret_file(env.root, P12_PASSWORD, "p12-password")
        env.agentctl("import", "file", pki.client_p12(), "--host", "other.example.com",
                     "--p12-password-file", password)  # fmt: skip
        for name, words in (("file", "did not come from EST"), ("nope", "no identity named")):
            refused = env.agentctl("renew", name, check=False)
            assert refused.returncode == 1 and words in refused.stderr, refused.stderr
        env.agentctl("lock")
        locked = env.agentctl("renew", "dev", check=False)
        assert locked.returncode == 1 and "unlock" in locked.stderr
        assert len(est.issued) == 3
    finally:
        agent.stop()
    events = [json.loads(line) for line in env.audit_log.read_text().splitlines()]
    enrolled = [e for e in events if e["event"] == "enroll"]
    renewed = [e for e in events if e["event"] == "renew"]
    assert [e["serial"] for e in enrolled] == [hex_serial(est.issued[0])]
    assert [e["serial"] for e in renewed] == [hex_serial(c) for c in est.issued[1:]]
    assert renewed[0]["identity"] == "dev" and renewed[0]["source"] == "est"
    assert renewed[0]["uid"] == os.getuid() and renewed[0]["pid"] not in (None, agent.pid)


def test_an_expired_identity_is_told_to_enroll_again_not_to_renew_in_a_circle(
    env: AgentEnv, est: EstServer, nginx: Nginx
) -> None:
    """A renewal authenticates with the current certificate, so an expired
    one is refused at the handshake: the messages must lead out of that."""
    est.lifetimes = [dt.timedelta(seconds=60)]
    est.backdate = dt.timedelta(seconds=58)  # expires two seconds after it is issued
    enroll(env, est)
    expires = est.issued[0].not_valid_after_utc.timestamp()
    time.sleep(max(0.0, expires - time.time() + 0.2))  # the certificate's own time: no event
    agent = start_unlocked(env)
    try:
        answer = curl(env.proxy_socket, f"http://{nginx.host_header}/echo")
        assert answer.status == 403 and answer.json()["error"] == "identity-expired"
        assert (
            "'agentctl remove dev', then 'agentctl enroll dev --est URL" in answer.json()["message"]
        )
        refused = env.agentctl("renew", "dev", check=False)
        assert refused.returncode == 1
        assert "which EST servers refuse for a renewal" in refused.stderr, refused.stderr
        assert "remove it ('agentctl remove dev') and enroll it again" in refused.stderr
    finally:
        agent.stop()
