"""D, scale: the agent with 1, 100, 1,000 and 10,000 identities.

Each vault holds the identity the origin accepts twice over, imported with
``agentctl import`` as a user would: ``a-origin`` bound to ``localhost``
(first by name) and ``z-origin-ip`` bound to ``127.0.0.1`` (last by name),
so a request can be routed to the first or the last identity. The others
are generated here (EC P-256, signed by the bench intermediate) with a mix
of host patterns (exact names, names with a port, wildcards, two patterns
on one identity; half trust the bench root, half the system store) and
sealed and written by the product's own ``Vault.store``. ``agentctl
import`` per identity would make setting up 10,000 take most of the run,
and so would ``Vault.store`` into the growing vault itself (each store
lists the whole folder: quadratic), so each is stored into an empty
staging copy of the vault (the same vault.json, so sealed to the same key)
and its file then renamed into the real vault. The fsyncs are skipped while
generating (durability is not what a throw-away vault needs); everything
measured runs the product unchanged.

Measured per size: the agent's start-up to both sockets (locked), its
memory locked and unlocked, ``agentctl unlock`` minus an ``agentctl
status`` round trip (the CLI's own start-up) minus the KDF alone (scrypt
with the vault's stored parameters), the request rate and latency through
the first and the last identity, and ``Router.candidates`` timed
in-process for an exact name, a wildcard match, and a miss.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import time
import timeit
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from bench.peers import PASSPHRASE, AgentForwarder, AgentHome, Origin
from bench.procs import BenchError, rss_kib
from bench.workloads import MB, h2load, percentile

FIRST = "a-origin"
LAST = "z-origin-ip"


def host_patterns(i: int) -> list[str]:
    """The host patterns of generated identity ``i``: a mix users have."""
    kind = i % 4
    if kind == 0:
        return [f"*.team{i}.corp.example"]
    if kind == 1:
        return [f"svc{i}.corp.example", f"svc{i}-alt.corp.example"]
    if kind == 2:
        return [f"api{i}.corp.example:8443"]
    return [f"db{i}.corp.example", f"*.db{i}.corp.example"]


@contextlib.contextmanager
def _no_fsync() -> Iterator[None]:
    with mock.patch.object(os, "fsync", lambda fd: None):
        yield


def populate(agent: AgentForwarder, count: int) -> float:
    """Fill a new vault with ``count`` identities (see the module doc); seconds taken."""
    from agent.identity import new_identity
    from agent.vault import Vault

    started = time.perf_counter()
    home, pki = agent.home, agent.pki
    agent.setup_vault(FIRST)  # agentctl init, and import of the identity for localhost
    if count >= 2:
        home.agentctl(
            "import",
            LAST,
            pki.client_p12,
            "--host",
            "127.0.0.1",
            "--ca",
            pki.root,
            "--p12-password-file",
            pki.p12_password_file,
        )
    staging = home.root / "staging-vault"
    staging.mkdir(mode=0o700)
    shutil.copy2(home.vault_dir / "vault.json", staging / "vault.json")
    vault = Vault(staging)
    stored, target = staging / "identities", home.vault_dir / "identities"
    root_pem = pki.root.read_bytes()
    chain_tail = [pki.intermediate.cert]
    seen: set[str] = set()
    with _no_fsync():
        for i in range(max(0, count - 2)):
            hosts = host_patterns(i)
            if seen.intersection(hosts):
                raise BenchError(f"generated host patterns repeat: {hosts}")
            seen.update(hosts)
            cert, key = pki.intermediate.sign_client(f"bench identity {i}")
            identity = new_identity(
                f"m-{i:05d}",
                key,
                [cert, *chain_tail],
                hosts,
                ca_pem=root_pem if i % 2 else None,
                source={"kind": "pkcs12-file"},
            )
            vault.store(identity.name, identity.to_metadata(), key)
            os.rename(stored / f"{identity.name}.json", target / f"{identity.name}.json")
    shutil.rmtree(staging)
    return time.perf_counter() - started


def kdf_seconds(vault_dir: Path, rounds: int) -> float:
    """The median time of the vault's KDF alone, with its stored parameters."""
    params = json.loads((vault_dir / "vault.json").read_text())["kdf"]
    times = []
    for _ in range(rounds):
        kdf = Scrypt(salt=os.urandom(16), length=32, n=params["n"], r=params["r"], p=params["p"])
        started = time.perf_counter()
        kdf.derive(PASSPHRASE.encode())
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def routing_ns(vault_dir: Path, count: int) -> dict[str, float]:
    """``Router.candidates`` in-process, ns per call, for hosts that hit and miss."""
    from agent.keychain import read_identities
    from agent.routing import Router
    from agent.vault import Vault

    identities, broken = read_identities(Vault(vault_dir))
    if broken or len(identities) != count:
        raise BenchError(f"D {count}: the vault reads {len(identities)} identities, {broken}")
    started = time.perf_counter()
    router = Router(identities.values())
    build = time.perf_counter() - started
    probes = {"exact": ("localhost", 443), "miss": ("nobody.example", 443)}
    if count > 2:
        probes["wildcard"] = ("x.team0.corp.example", 443)
    figures = {"router_build_ms": build * 1e3}
    for label, (host, port) in probes.items():
        found = router.candidates(host, port)
        if bool(found) == (label == "miss"):
            raise BenchError(f"D {count}: routing {host} found {[i.name for i in found]}")
        timer = timeit.Timer(lambda h=host, p=port: router.candidates(h, p))
        loops = 20000
        best = min(timer.repeat(repeat=5, number=loops))
        figures[f"route_{label}_ns"] = best / loops * 1e9
    return figures


def measure_size(
    agent: AgentForwarder,
    origin: Origin,
    count: int,
    *,
    rounds: int,
    clients: int,
    duration: float,
    warmup: float,
) -> dict[str, Any]:
    """Every figure for one vault size (see the module doc); the agent is left stopped."""
    home = agent.home
    figures: dict[str, Any] = {"identities": count, "populate_s": populate(agent, count)}
    started = time.perf_counter()
    agent.launch()
    figures["start_s"] = time.perf_counter() - started
    try:
        status = json.loads(home.agentctl("status", "--json").stdout)
        if status.get("identities") != count:
            raise BenchError(f"D {count}: the agent sees {status.get('identities')} identities")
        figures["rss_locked_mb"] = rss_kib([agent.pid]) * 1024 / MB
        unlocks, statuses, rss_unlocked = [], [], []
        per_round: list[dict[str, float]] = []
        for r in range(rounds):
            statuses.append(home.agentctl("status").seconds)
            timing = agent.unlock()
            if f"unlocked: {count} identit" not in timing.stdout:
                raise BenchError(f"D {count}: unlock said {timing.stdout.strip()!r}")
            unlocks.append(timing.seconds)
            time.sleep(0.2)
            rss_unlocked.append(rss_kib([agent.pid]) * 1024 / MB)
            per_round.append(_routes(agent, origin, count, clients, duration, warmup))
            if r < rounds - 1:
                home.agentctl("lock")
        kdf = kdf_seconds(home.vault_dir, rounds)
        figures.update(
            unlock_cli_s=statistics.median(unlocks),
            status_cli_s=statistics.median(statuses),
            kdf_s=kdf,
            unlock_after_kdf_s=statistics.median(unlocks) - statistics.median(statuses) - kdf,
            rss_unlocked_mb=rss_unlocked[0],
            rss_unlocked_last_mb=rss_unlocked[-1],
        )
        for key in per_round[0]:
            figures[key] = statistics.median(r[key] for r in per_round)
        figures.update(routing_ns(home.vault_dir, count))
    finally:
        agent.stop()
    return figures


def _routes(
    agent: AgentForwarder, origin: Origin, count: int, clients: int, duration: float, warmup: float
) -> dict[str, float]:
    """Request rate and p50 through the first and (with two or more) the last identity."""
    hosts = {"first": "localhost"}
    if count >= 2:
        hosts["last"] = "127.0.0.1"
    figures = {}
    for label, host in hosts.items():
        url = f"http://{host}:{origin.port}/small"
        log = agent.home.root / "h2load-d.log"
        result = h2load(
            agent.socket, url, clients=clients, duration=duration, log=log, warmup=warmup
        )
        if result.failed or not result.succeeded:
            raise BenchError(f"D {count} via {host}: {result.failed} requests failed")
        figures[f"{label}_req_per_s"] = result.rate
        figures[f"{label}_p50_ms"] = percentile(result.latencies_us, 0.5) / 1e3
    return figures


def new_agent(root: Path, origin: Origin, count: int) -> AgentForwarder:
    """An agent peer in a fresh home of its own, for a vault of ``count`` identities."""
    folder = root / f"scale-{count}"
    folder.mkdir(exist_ok=True)
    return AgentForwarder(folder, origin, AgentHome())
