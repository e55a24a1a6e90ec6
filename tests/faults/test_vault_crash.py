"""The vault under crashes and contention, through the real agentctl and agent.

Kill-9 rounds: ``agentctl import`` is killed with SIGKILL, in real
subprocesses, at random moments: half over its whole run, half inside its
write: strace kills it as it enters one of the write's system calls
(``CRASH_POINTS``), in random order. After every round the vault must list every
identity stored before; at the end the real agent must unlock and serve
each one to its own upstream, and no temporary file may be left.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agent import AgentEnv, console_script, start_agent, write_secret_file
from support.fault_servers import FaultServer, echo_client_cn, tls_context
from support.pki import P12_PASSWORD, Pki
from support.tools import require_tool

from agent.keychain import read_identities
from agent.vault import Vault
from faults.conftest import PASSPHRASE, unlock
from faults.probe import exchange, record, request


@pytest.fixture
def env() -> Iterator[AgentEnv]:
    e = AgentEnv()
    try:
        e.agentctl("init", "--passphrase-file", e.passphrase_file(PASSPHRASE))
        yield e
    finally:
        e.cleanup()


class Identities:
    """Distinct client identities (own CN) and one upstream per identity, echoing the CN."""

    def __init__(self, pki: Pki, env: AgentEnv, count: int) -> None:
        self.env = env
        self.password = write_secret_file(env.root, P12_PASSWORD, "p12-password")
        self.p12: list[Path] = []
        self.cns: list[str] = []
        self.servers = [
            FaultServer(echo_client_cn(), tls_context(pki)).start() for _ in range(count)
        ]
        for i in range(count):
            leaf = pki.issue_client(f"crash client {i}", name=f"crash-{os.getpid()}-{i}")
            self.cns.append(leaf.cn)
            self.p12.append(pki.client_p12(leaf=leaf, path=env.root / f"id-{i}.p12"))
        self.root_pem = pki.root_pem

    def import_cmd(self, i: int, name: str | None = None, host: str | None = None) -> list[str]:
        return [
            *console_script("agentctl", "cli"), "import", name or f"id-{i}", str(self.p12[i]),
            "--host", host or self.servers[i].host_header, "--ca", str(self.root_pem),
            "--p12-password-file", str(self.password),
        ]  # fmt: skip

    def start_import(
        self, i: int, prefix: tuple[str, ...] | list[str] = (), **kw: str
    ) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*prefix, *self.import_cmd(i, **kw)], env=self.env.env, cwd=self.env.root,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def close(self) -> None:
        for server in self.servers:
            server.close()


@contextlib.contextmanager
def identities(pki: Pki, env: AgentEnv, count: int) -> Iterator[Identities]:
    ids = Identities(pki, env, count)
    try:
        yield ids
    finally:
        ids.close()


def _vault_state(env: AgentEnv) -> tuple[set[str], dict[str, str]]:
    """The identities the vault lists whole, and the broken ones (read as agentctl list does)."""
    whole, broken = read_identities(Vault(env.vault_dir))
    return set(whole), broken


def _leftovers(env: AgentEnv) -> list[str]:
    return sorted(str(p.relative_to(env.vault_dir)) for p in env.vault_dir.rglob(".tmp-*"))


def _kill(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)


def _kill_at_random_time(ids: Identities, i: int, span: float, rng: random.Random) -> str:
    proc = ids.start_import(i)
    time.sleep(rng.uniform(0, span))
    finished = proc.poll() is not None
    _kill(proc)
    return "finished before the kill" if finished else "killed"


#: Where an import's write can die, in the order it makes these system calls
#: under the writer lock: taking the lock, syncing its temporary file, renaming
#: it over the identity's file, syncing the folder. strace kills it with
#: SIGKILL as it enters the call, so each point is hit exactly.
CRASH_POINTS = (
    ("flock", 1, "taking the writer lock"),
    ("fsync", 1, "syncing its temporary file"),
    ("rename", 1, "renaming it into place"),
    ("fsync", 2, "syncing the folder after the rename"),
)


def _kill_inside_the_write(ids: Identities, i: int, point: tuple[str, int, str]) -> str:
    call, nth, where = point
    strace = [
        require_tool("strace"), "-qq", "-f", "-o", os.devnull, "-e", f"trace={call}",
        "-e", f"inject={call}:signal=KILL:when={nth}",
    ]  # fmt: skip
    proc = ids.start_import(i, prefix=strace)
    proc.communicate(timeout=60)
    return f"killed {where}" if proc.returncode != 0 else "finished (no kill)"


def _calibrate(ids: Identities) -> float:
    """How long a whole import takes (seconds)."""
    start = time.monotonic()
    proc = ids.start_import(0, name="calibration", host="calibration.example")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    whole = time.monotonic() - start
    ids.env.agentctl("remove", "calibration")
    return whole


@pytest.mark.parametrize(("when", "rounds"), [("at-random-times", 10), ("inside-the-write", 20)])
def test_imports_killed_with_sigkill_lose_no_identity(
    env: AgentEnv, pki: Pki, when: str, rounds: int
) -> None:
    rng = random.Random(os.environ.get("MTLS_FAULT_SEED", f"{when}-{time.time_ns()}"))
    began = time.monotonic()
    points = [CRASH_POINTS[i % len(CRASH_POINTS)] for i in range(rounds)]
    rng.shuffle(points)
    with identities(pki, env, rounds + 1) as ids:
        whole = _calibrate(ids)
        stored: set[str] = set()
        outcomes: list[str] = []
        debris_rounds = 0
        for i in range(rounds):
            if when == "at-random-times":
                outcome = _kill_at_random_time(ids, i, whole * 1.1, rng)
            else:
                outcome = _kill_inside_the_write(ids, i, points[i])
            listed, broken = _vault_state(env)
            assert broken == {}, f"round {i}: a kill left a broken identity: {broken}"
            assert stored <= listed, f"round {i}: lost {stored - listed}"
            assert listed <= stored | {f"id-{i}"}, listed
            debris_rounds += bool(_leftovers(env))
            stored = listed
            outcomes.append(f"{outcome}, {'stored' if f'id-{i}' in listed else 'not stored'}")

        # the next writer sweeps the debris; then the vault holds no temporary file
        last = rounds
        env.agentctl(*ids.import_cmd(last)[len(console_script("agentctl", "cli")) :])
        stored.add(f"id-{last}")
        assert _leftovers(env) == []

        listed_rows = json.loads(env.agentctl("list", "--json").stdout)
        assert {row["name"] for row in listed_rows} == stored
        assert not any("broken" in row for row in listed_rows)

        agent = start_agent(env)
        try:
            unlock(env)
            status = json.loads(env.agentctl("status", "--json").stdout)
            assert status["broken"] == {} and status["loaded"] == len(stored)
            for name in sorted(stored):
                i = int(name.split("-")[1])
                outcome = exchange(env.proxy_socket, request(ids.servers[i].host_header, "/who"))
                assert outcome.status == 200, (name, outcome.describe())
                assert outcome.response.body == ids.cns[i].encode()  # type: ignore[union-attr]
            # the keys were loaded without leaving a scratch file behind
            runtime = sorted(p.name for p in env.runtime_dir.iterdir())
            assert runtime == ["agent.lock", "agent.sock", "control.sock"], runtime
        finally:
            agent.stop()
    kills = [o for o in outcomes if o.startswith("killed")]
    summary = (
        f"{len(kills)} of {rounds} killed mid-run, {debris_rounds} leaving a temporary file "
        f"(swept by the next writer), {len(stored) - 1} stored; nothing lost"
    )
    print(f"\n{when}: {summary}\n  " + "\n  ".join(outcomes))
    record(
        f"vault: {rounds} imports SIGKILLed {when.replace('-', ' ')}",
        summary,
        time.monotonic() - began,
    )
    assert kills, "no round was killed before it finished: the test proved nothing"


def test_two_imports_at_the_same_moment_both_succeed_or_one_says_vault_busy(
    env: AgentEnv, pki: Pki
) -> None:
    with identities(pki, env, 2) as ids:
        procs = [ids.start_import(i) for i in range(2)]
        results = [(p.wait(60), *p.communicate()) for p in procs]
        listed, broken = _vault_state(env)
    for i, (code, _out, err) in enumerate(results):
        if code == 0:
            assert f"id-{i}" in listed
        else:
            assert (
                err.strip() == "agentctl: vault busy: another agentctl is writing to it; try again."
            ), err
    record("vault: two imports at the same moment", f"exit codes {[r[0] for r in results]}", None)
    assert broken == {} and _leftovers(env) == []


def test_two_imports_of_one_name_at_once_store_one_and_refuse_the_other_cleanly(
    env: AgentEnv, pki: Pki
) -> None:
    with identities(pki, env, 2) as ids:
        procs = [ids.start_import(i, name="same") for i in range(2)]
        results = [(p.wait(60), *p.communicate()) for p in procs]
        listed, broken = _vault_state(env)
        metadata = Vault(env.vault_dir).read_metadata("same")
    codes = sorted(r[0] for r in results)
    assert codes == [0, 1], results
    [(_, _, err)] = [r for r in results if r[0] == 1]
    assert err.count("\n") == 1 and err.startswith("agentctl: ") and "same" in err, err
    assert listed == {"same"} and broken == {}
    winner = next(i for i, r in enumerate(results) if r[0] == 0)
    assert metadata["hosts"] == [ids.servers[winner].host_header]


def _waits_on_the_lock(pid: int, lock: Path) -> bool:
    """Whether process ``pid`` has the vault's lock file open (it is waiting to write)."""
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == str(lock):
                    return True
    return False


def test_two_imports_of_one_host_at_once_never_leave_a_tie(env: AgentEnv, pki: Pki) -> None:
    """A tie between two identities for one host is refused at import time; a
    concurrent import must not slip one past the other's check.

    The test holds the writer lock, as a third agentctl would, until both
    imports wait on it, so both have read the vault before either writes.
    """
    lock_path = env.vault_dir / ".lock"
    with identities(pki, env, 2) as ids:
        with open(lock_path) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            procs = [ids.start_import(i, host="tie.example") for i in range(2)]
            deadline = time.monotonic() + 30
            while not all(_waits_on_the_lock(p.pid, lock_path) for p in procs):
                assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
                assert time.monotonic() < deadline, "the imports never reached the vault lock"
                time.sleep(0.005)
        results = [(p.wait(60), *p.communicate()) for p in procs]
        listed, _ = _vault_state(env)
    record(
        "vault: two imports for one host at once",
        f"exit codes {sorted(r[0] for r in results)}, stored {sorted(listed)}",
        None,
    )
    assert len(listed) == 1, f"both were stored with the same host pattern: {results}"
    [(_, _, err)] = [r for r in results if r[0] != 0]
    assert err.startswith("agentctl: ") and "tie.example" in err, err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _without_write_permission() -> list[str]:
    """A command prefix under which this process's own folders marked 0500 cannot be written.

    A normal user needs none. Root writes through any mode, so its writes are
    made to obey the mode bits by dropping the capabilities that override
    them (setpriv from util-linux): the kernel then refuses, as for any user.
    """
    if os.geteuid() != 0:
        return []
    setpriv = require_tool("setpriv")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner,-linux_immutable"]


def test_a_read_only_vault_folder_gives_a_clear_error_and_loses_nothing(
    env: AgentEnv, pki: Pki
) -> None:
    with identities(pki, env, 2) as ids:
        env.agentctl(*ids.import_cmd(0)[len(console_script("agentctl", "cli")) :])
        prefix = _without_write_permission()
        for folder in (env.vault_dir / "identities", env.vault_dir):
            folder.chmod(0o500)
        before = _snapshot(env.vault_dir)
        try:
            result = subprocess.run(
                [*prefix, *ids.import_cmd(1)], env=env.env, cwd=env.root, capture_output=True,
                text=True, stdin=subprocess.DEVNULL, timeout=60, check=False,
            )  # fmt: skip
            listed = subprocess.run(
                [*prefix, *console_script("agentctl", "cli"), "list", "--json"], env=env.env,
                cwd=env.root, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
        finally:
            for folder in (env.vault_dir, env.vault_dir / "identities"):
                folder.chmod(0o700)
    record("vault: import into a read-only vault folder", result.stderr.strip(), None)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert result.stderr.strip() == (
        f"agentctl: cannot write to the vault folder {env.vault_dir}: permission denied."
    ), result.stderr
    assert _snapshot(env.vault_dir) == before
    assert listed.returncode == 0, listed.stderr
    assert [row["name"] for row in json.loads(listed.stdout)] == ["id-0"]


def test_a_corrupt_sealed_key_is_named_at_unlock_and_the_others_serve(
    env: AgentEnv, pki: Pki
) -> None:
    with identities(pki, env, 3) as ids:
        for i in range(3):
            env.agentctl(*ids.import_cmd(i)[len(console_script("agentctl", "cli")) :])
        victim = env.vault_dir / "identities" / "id-1.json"
        doc = json.loads(victim.read_text())
        ct = bytearray(doc["sealed_key"]["ct"].encode())
        ct[10] = ord("A") if ct[10] != ord("A") else ord("B")
        doc["sealed_key"]["ct"] = ct.decode()
        victim.write_text(json.dumps(doc))
        agent = start_agent(env)
        try:
            result = env.agentctl(
                "unlock", "--passphrase-file", env.passphrase_file(PASSPHRASE), check=False
            )
            status = json.loads(env.agentctl("status", "--json").stdout)
            answers = {
                i: exchange(env.proxy_socket, request(ids.servers[i].host_header, "/who"))
                for i in range(3)
            }
        finally:
            agent.stop()
    record("vault: one corrupt sealed key at unlock", result.stderr.strip(), None)
    assert "id-1" in result.stderr and "id-0" not in result.stderr, result.stderr
    assert list(status["broken"]) == ["id-1"] and status["loaded"] == 2
    assert answers[0].status == 200 and answers[2].status == 200
    assert answers[0].response.body == ids.cns[0].encode()  # type: ignore[union-attr]
    assert answers[1].status == 403
    assert answers[1].response.header("Mtls-Agent-Error") == "no-identity-for-host"  # type: ignore[union-attr]
