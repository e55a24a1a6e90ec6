"""agent.policy: caller rules, which identity a caller gets, and how rules are kept.

Callers are real: this test process, with its real executable, under its
own credentials or claiming others (the uid and gid rules only compare
numbers the kernel reported, so a claim is as good as a second user here;
tests/test_hardening.py runs a second OS user for real). Identities are
built from the test PKI and stored in real vaults.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.pki import Pki

from agent.enroll import set_caller_rules, store_identity
from agent.errors import IdentityError, Locked, PeerDenied
from agent.identity import Identity, new_identity
from agent.keychain import Keychain
from agent.peer import Caller, Peer
from agent.policy import NO_RULES, CallerRules, choose, shown
from agent.routing import conflicts
from agent.vault import Vault

PYTHON = os.path.realpath(sys.executable)
PYTHON_SHA256 = hashlib.sha256(Path(PYTHON).read_bytes()).hexdigest()
OTHER_SHA256 = "0" * 64
PASSPHRASE = "policy tests"
CHEAP_KDF_N = 2**12


def me() -> Caller:
    return Caller(Peer(os.getpid(), os.getuid(), os.getgid()))


def claiming(uid: int, gid: int = 4242) -> Caller:
    """This process, as if the kernel had reported ``uid``/``gid`` for it."""
    return Caller(Peer(os.getpid(), uid, gid))


def gone() -> Caller:
    """A caller whose process has exited (and been reaped) since it connected."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    caller = Caller(Peer(child.pid, os.getuid(), os.getgid()))
    child.wait()
    return caller


def make(pki: Pki, name: str, *hosts: str, rules: CallerRules = NO_RULES) -> Identity:
    return new_identity(
        name, pki.client.key, pki.client.chain, list(hosts or ("api.example.com",)), callers=rules
    )


# --- the rules ----------------------------------------------------------------------


def test_rules_are_put_in_canonical_form_so_equal_meanings_compare_equal() -> None:
    a = CallerRules(uids=(2, 1, 1), exes=("/usr//bin/../bin/curl",), exe_sha256=("AB" * 32,))
    b = CallerRules(uids=(1, 2), exes=("/usr/bin/curl",), exe_sha256=("ab" * 32,))
    assert a == b
    assert a.uids == (1, 2) and a.exes == ("/usr/bin/curl",) and a.exe_sha256 == ("ab" * 32,)


@pytest.mark.parametrize(
    ("rules", "says"),
    [
        ({"uids": (-1,)}, "allow-uid -1"),
        ({"uids": (True,)}, "allow-uid True"),
        ({"uids": ("1000",)}, "allow-uid '1000'"),
        ({"gids": (2**32 - 1,)}, "allow-gid 4294967295"),
        ({"exes": ("curl",)}, "absolute path"),
        ({"exes": ("",)}, "absolute path"),
        ({"exe_sha256": ("abc",)}, "64 characters"),
        ({"exe_sha256": ("g" * 64,)}, "64 characters"),
    ],
)
def test_malformed_rules_are_refused(rules: dict[str, Any], says: str) -> None:
    with pytest.raises(IdentityError, match=says):
        CallerRules(**rules)


@pytest.mark.parametrize(
    ("host", "port", "said"),
    [
        ("api.example.com", 443, "api.example.com"),
        ("api.example.com", 8443, "api.example.com:8443"),
        ("::1", 443, "[::1]"),
        ("::1", 47443, "[::1]:47443"),
    ],
)
def test_messages_name_a_target_as_a_url_would(host: str, port: int, said: str) -> None:
    assert shown(host, port) == said


def test_no_rules_admit_every_caller_even_an_unknown_one() -> None:
    assert not NO_RULES
    assert NO_RULES.refusal(None) is None
    assert NO_RULES.refusal(gone()) is None


@pytest.mark.parametrize(
    ("rules", "caller", "admitted"),
    [
        (CallerRules(uids=(1001,)), lambda: claiming(1001), True),
        (CallerRules(uids=(1001, 1002)), lambda: claiming(1002), True),
        (CallerRules(uids=(1001,)), lambda: claiming(1003), False),
        (CallerRules(gids=(50,)), lambda: claiming(1001, 50), True),
        (CallerRules(gids=(50,)), lambda: claiming(1001, 51), False),
        (CallerRules(exes=(PYTHON,)), me, True),
        (CallerRules(exes=("/usr/bin/curl", PYTHON)), me, True),
        (CallerRules(exes=("/usr/bin/curl",)), me, False),
        (CallerRules(exe_sha256=(PYTHON_SHA256,)), me, True),
        (CallerRules(exe_sha256=(OTHER_SHA256,)), me, False),
        # every kind given must hold
        (CallerRules(uids=(1001,), exes=(PYTHON,)), lambda: claiming(1001), True),
        (CallerRules(uids=(1001,), exes=(PYTHON,)), lambda: claiming(1002), False),
        (CallerRules(uids=(1001,), exes=("/usr/bin/curl",)), lambda: claiming(1001), False),
        (CallerRules(exes=(PYTHON,), exe_sha256=(OTHER_SHA256,)), me, False),
        (CallerRules(exes=(PYTHON,), exe_sha256=(PYTHON_SHA256,)), me, True),
    ],
)
def test_every_kind_of_rule_must_hold_and_any_value_of_a_kind_will_do(
    rules: CallerRules, caller: Any, admitted: bool
) -> None:
    assert (rules.refusal(caller()) is None) is admitted


def test_a_refusal_names_the_rule_that_failed_and_the_value_that_did_not_match() -> None:
    assert CallerRules(uids=(1001,)).refusal(claiming(7)) == "uid 7 is not allowed (allow-uid 1001)"
    assert CallerRules(gids=(5, 6)).refusal(claiming(7, 8)) == (
        "gid 8 is not allowed (allow-gid 5, 6)"
    )
    assert CallerRules(exes=("/usr/bin/curl",)).refusal(me()) == (
        f"executable {PYTHON} is not allowed (allow-exe /usr/bin/curl)"
    )
    assert CallerRules(exe_sha256=(OTHER_SHA256,)).refusal(me()) == (
        f"executable {PYTHON} has SHA-256 {PYTHON_SHA256}, which is not allowed"
        f" (allow-exe-sha256 {OTHER_SHA256})"
    )


def test_an_executable_rule_refuses_a_caller_whose_program_cannot_be_attested() -> None:
    refusal = CallerRules(exes=(PYTHON,)).refusal(gone())
    assert refusal is not None and "could not be attested" in refusal


def test_uid_rules_are_checked_before_the_executable_is_looked_at() -> None:
    caller = claiming(7)
    assert CallerRules(uids=(1001,), exes=(PYTHON,)).refusal(caller) is not None
    assert caller._attested is None and caller._failure is None  # /proc never read


def test_any_rule_refuses_an_unknown_caller() -> None:
    assert CallerRules(uids=(os.getuid(),)).refusal(None) == "the calling process is unknown"


# --- which identity a caller gets ---------------------------------------------------------


def test_the_most_specific_identity_that_admits_the_caller_is_chosen(pki: Pki) -> None:
    exact = make(pki, "exact", "api.example.com", rules=CallerRules(uids=(1001,)))
    wildcard = make(pki, "wildcard", "*.example.com")
    candidates = [exact, wildcard]
    assert choose(candidates, "api.example.com", 443, claiming(1001)) is exact
    assert choose(candidates, "api.example.com", 443, claiming(1002)) is wildcard


def test_identities_sharing_a_pattern_go_each_to_its_own_caller(pki: Pki) -> None:
    curl = make(pki, "curl", rules=CallerRules(exes=("/usr/bin/curl",)))
    python = make(pki, "python", rules=CallerRules(exes=(PYTHON,)))
    assert choose([curl, python], "api.example.com", 443, me()) is python
    assert choose([python, curl], "api.example.com", 443, me()) is python


def test_a_caller_both_identities_admit_is_refused_rather_than_guessed(pki: Pki) -> None:
    by_uid = make(pki, "by-uid", rules=CallerRules(uids=(os.getuid(),)))
    by_exe = make(pki, "by-exe", rules=CallerRules(exes=(PYTHON,)))
    wildcard = make(pki, "wildcard", "*.example.com")
    with pytest.raises(PeerDenied) as denied:
        choose([by_uid, by_exe, wildcard], "api.example.com", 443, me())
    assert denied.value.reason is not None
    assert "'by-uid' and 'by-exe'" in denied.value.reason
    assert "by-" not in denied.value.message


def test_a_caller_no_identity_admits_is_refused_with_each_reason_logged_not_answered(
    pki: Pki,
) -> None:
    exact = make(pki, "exact", "api.example.com:8443", rules=CallerRules(uids=(1001,)))
    wildcard = make(pki, "wildcard", "*.example.com", rules=CallerRules(exes=("/usr/bin/curl",)))
    with pytest.raises(PeerDenied) as denied:
        choose([exact, wildcard], "api.example.com", 8443, claiming(1002))
    exc = denied.value
    assert (exc.status, exc.code) == (403, "peer-denied")
    assert exc.reason == (
        "identity 'exact': uid 1002 is not allowed (allow-uid 1001); "
        f"identity 'wildcard': executable {PYTHON} is not allowed (allow-exe /usr/bin/curl)"
    )
    assert exc.message == "No identity for api.example.com:8443 admits this process."


# --- rules at rest -----------------------------------------------------------------------


def test_caller_rules_round_trip_through_metadata_as_version_2(pki: Pki) -> None:
    rules = CallerRules(uids=(1001,), gids=(50,), exes=("/usr/bin/curl",), exe_sha256=("a" * 64,))
    identity = make(pki, "ruled", rules=rules)
    metadata = identity.to_metadata()
    assert metadata["version"] == 2
    assert metadata["callers"] == {
        "uids": [1001], "gids": [50], "exes": ["/usr/bin/curl"], "exe_sha256": ["a" * 64],
    }  # fmt: skip
    restored = Identity.from_metadata("ruled", metadata)
    assert restored == identity and restored.callers == rules
    assert identity.summary()["callers"] == metadata["callers"]


def test_an_identity_without_rules_is_written_as_before(pki: Pki) -> None:
    metadata = make(pki, "plain").to_metadata()
    assert metadata["version"] == 1 and "callers" not in metadata
    assert Identity.from_metadata("plain", metadata).callers == NO_RULES
    assert "callers" not in make(pki, "plain").summary()


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda m: {**m, "version": 1}, "caller rules need metadata version 2"),
        (lambda m: {k: v for k, v in m.items() if k != "callers"}, "'callers'"),
        (lambda m: {**m, "callers": ["uids"]}, "'callers'"),
        (lambda m: {**m, "callers": {"uids": "1001"}}, "'callers' is malformed"),
        (lambda m: {**m, "callers": {"uids": [-5]}}, "allow-uid -5"),
        (lambda m: {**m, "callers": {"exes": ["bin/curl"]}}, "absolute path"),
    ],
    ids=["rules-under-v1", "v2-without-rules", "not-an-object", "not-a-list", "bad-uid", "rel"],
)
def test_rules_on_disk_that_cannot_be_trusted_refuse_the_identity(
    pki: Pki, change: Any, says: str
) -> None:
    metadata = make(pki, "ruled", rules=CallerRules(uids=(1001,))).to_metadata()
    with pytest.raises(IdentityError, match=says):
        Identity.from_metadata("ruled", change(metadata))


@pytest.mark.parametrize(
    ("first", "second", "tie"),
    [
        (NO_RULES, NO_RULES, "may share a pattern only when both"),
        (CallerRules(uids=(1,)), NO_RULES, "may share a pattern only when both"),
        (NO_RULES, CallerRules(uids=(1,)), "may share a pattern only when both"),
        (CallerRules(uids=(1,)), CallerRules(uids=(1,)), "with the same caller rules"),
        (CallerRules(uids=(1,)), CallerRules(uids=(2,)), None),
        (CallerRules(uids=(1, 2)), CallerRules(uids=(2, 3)), "one process could pass both"),
        (CallerRules(uids=(1,)), CallerRules(exes=("/usr/bin/curl",)), "could pass both"),
        (CallerRules(gids=(1,)), CallerRules(uids=(1,), gids=(2,)), None),
        (CallerRules(exes=("/usr/bin/curl",)), CallerRules(exes=("/usr/bin/wget",)), None),
        (CallerRules(exe_sha256=("a" * 64,)), CallerRules(exe_sha256=("b" * 64,)), None),
        (CallerRules(exes=("/usr/bin/curl",)), CallerRules(exe_sha256=("b" * 64,)), "pass both"),
    ],
)
def test_a_shared_host_pattern_needs_distinct_rules_on_both_identities(
    pki: Pki, first: CallerRules, second: CallerRules, tie: str | None
) -> None:
    existing = [make(pki, "first", "api.example.com", "*.other.org", rules=first)]
    problems = conflicts(existing, make(pki, "second", "api.example.com", rules=second))
    if tie is None:
        assert problems == []
    else:
        [problem] = problems
        assert "'api.example.com' is already bound to identity 'first'" in problem
        assert tie in problem
    assert conflicts(existing, make(pki, "third", "www.example.com", rules=second)) == []


# --- routing with callers, on a real vault --------------------------------------------


@pytest.fixture
def vault(tmp_path: Path) -> Vault:
    v = Vault(tmp_path / "vault")
    v.create(PASSPHRASE, kdf_n=CHEAP_KDF_N)
    return v


def store(vault: Vault, pki: Pki, identity: Identity) -> None:
    store_identity(vault, identity, pki.client.key)


async def keychain_of(vault: Vault, tmp_path: Path, *, unlocked: bool = True) -> Keychain:
    keychain = Keychain(vault, tmp_path)
    if unlocked:
        await keychain.unlock(PASSPHRASE)
    else:
        await keychain.reload()
    return keychain


async def test_route_gives_each_caller_its_identity_and_refuses_the_rest(
    vault: Vault, pki: Pki, tmp_path: Path
) -> None:
    store(vault, pki, make(pki, "mine", rules=CallerRules(uids=(os.getuid(),))))
    store(vault, pki, make(pki, "theirs", rules=CallerRules(uids=(1001,))))
    keychain = await keychain_of(vault, tmp_path)
    assert keychain.route("api.example.com", 443, me()).identity.name == "mine"
    assert keychain.route("api.example.com", 443, claiming(1001)).identity.name == "theirs"
    with pytest.raises(PeerDenied):
        keychain.route("api.example.com", 443, claiming(1002))
    with pytest.raises(PeerDenied):
        keychain.route("api.example.com", 443)  # no caller: rules admit nobody


async def test_route_without_a_caller_is_unchanged_for_identities_without_rules(
    vault: Vault, pki: Pki, tmp_path: Path
) -> None:
    store(vault, pki, make(pki, "plain", "api.example.com"))
    store(vault, pki, make(pki, "ruled", "*.example.com", rules=CallerRules(uids=(1001,))))
    keychain = await keychain_of(vault, tmp_path)
    assert keychain.route("api.example.com", 443).identity.name == "plain"
    assert keychain.route("api.example.com", 443, claiming(1001)).identity.name == "plain"
    assert keychain.route("www.example.com", 443, claiming(1001)).identity.name == "ruled"


async def test_a_refused_caller_is_refused_whether_locked_or_not(
    vault: Vault, pki: Pki, tmp_path: Path
) -> None:
    store(vault, pki, make(pki, "ruled", rules=CallerRules(uids=(1001,))))
    keychain = await keychain_of(vault, tmp_path, unlocked=False)
    with pytest.raises(PeerDenied):
        keychain.route("api.example.com", 443, claiming(1002))
    with pytest.raises(Locked):
        keychain.route("api.example.com", 443, claiming(1001))


async def test_changed_rules_apply_on_reload_while_unlocked(
    vault: Vault, pki: Pki, tmp_path: Path
) -> None:
    store(vault, pki, make(pki, "work", rules=CallerRules(uids=(1001,))))
    keychain = await keychain_of(vault, tmp_path)
    assert keychain.route("api.example.com", 443, claiming(1001)).identity.name == "work"
    set_caller_rules(vault, "work", CallerRules(uids=(1002,)))
    await keychain.reload()
    with pytest.raises(PeerDenied):
        keychain.route("api.example.com", 443, claiming(1001))
    assert keychain.route("api.example.com", 443, claiming(1002)).identity.name == "work"
    set_caller_rules(vault, "work", NO_RULES)
    await keychain.reload()
    assert keychain.route("api.example.com", 443).identity.name == "work"


def test_set_caller_rules_keeps_the_sealed_key_and_the_certificate(vault: Vault, pki: Pki) -> None:
    before = make(pki, "work")
    store(vault, pki, before)
    sealed = vault._read_identity("work")["sealed_key"]
    after = set_caller_rules(vault, "work", CallerRules(exes=("/usr/bin/curl",)))
    assert after.callers.exes == ("/usr/bin/curl",)
    assert (after.chain, after.hosts, after.created) == (before.chain, before.hosts, before.created)
    assert vault._read_identity("work")["sealed_key"] == sealed
    assert Identity.from_metadata("work", vault.read_metadata("work")) == after


def test_set_caller_rules_refuses_to_leave_a_tie_without_rules(vault: Vault, pki: Pki) -> None:
    store(vault, pki, make(pki, "a", rules=CallerRules(uids=(1,))))
    store(vault, pki, make(pki, "b", rules=CallerRules(uids=(2,))))
    before = vault.read_metadata("b")
    with pytest.raises(IdentityError, match="may share a pattern only when both"):
        set_caller_rules(vault, "b", NO_RULES)
    with pytest.raises(IdentityError, match="same caller rules"):
        set_caller_rules(vault, "b", CallerRules(uids=(1,)))
    assert vault.read_metadata("b") == before
