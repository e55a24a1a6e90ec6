"""Caller rules: which local processes may use an identity.

An identity may carry rules on its caller's uid, gid, executable path and
executable SHA-256 (as SPIRE's workload attestor does). Every kind of rule
that is given must hold; within one kind, any listed value will do. So
``--allow-uid 1000 --allow-exe /usr/bin/curl`` admits curl run by uid 1000
and nothing else. An identity without rules serves every caller the proxy
socket lets in. The gid is the caller's effective group as the kernel
reports it for the socket, not its supplementary groups.

Among the identities bound to a host, the most specific one whose rules
admit the caller is used. Two identities may share a host pattern only when
their rules exclude each other (``CallerRules.excludes``: they are meant for
different callers); should a caller pass both all the same (a vault written
before that check), it is refused, never guessed at. The rule that refused
a caller goes to the audit log (``PeerDenied.reason``), never into the
response.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from agent.errors import AttestationError, IdentityError, PeerDenied
from agent.peer import Caller

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel; never a real id


def _ids(kind: str, values: Iterable[Any]) -> tuple[int, ...]:
    out = set()
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_ID:
            raise IdentityError(f"{kind} {value!r} is not a numeric id from 0 to {_MAX_ID}")
        out.add(value)
    return tuple(sorted(out))


def _paths(values: Iterable[Any]) -> tuple[str, ...]:
    out = set()
    for value in values:
        if not isinstance(value, str) or not os.path.isabs(value) or "\0" in value:
            raise IdentityError(f"allow-exe {value!r} must be an absolute path")
        out.add(os.path.normpath(value))
    return tuple(sorted(out))


def _digests(values: Iterable[Any]) -> tuple[str, ...]:
    out = set()
    for value in values:
        digest = value.lower() if isinstance(value, str) else ""
        if not _SHA256_HEX.fullmatch(digest):
            raise IdentityError(
                f"allow-exe-sha256 {value!r} must be a SHA-256 in hex (64 characters,"
                " as sha256sum prints it)"
            )
        out.add(digest)
    return tuple(sorted(out))


def _listed(values: Sequence[object]) -> str:
    return ", ".join(str(v) for v in values)


@dataclass(frozen=True, slots=True)
class CallerRules:
    """Who may use an identity; empty means anyone the socket lets in.

    Values are checked and put in a canonical order at construction, so two
    rule sets that mean the same compare equal.
    """

    uids: tuple[int, ...] = ()
    gids: tuple[int, ...] = ()
    exes: tuple[str, ...] = ()
    exe_sha256: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "uids", _ids("allow-uid", self.uids))
        object.__setattr__(self, "gids", _ids("allow-gid", self.gids))
        object.__setattr__(self, "exes", _paths(self.exes))
        object.__setattr__(self, "exe_sha256", _digests(self.exe_sha256))

    def __bool__(self) -> bool:
        return bool(self.uids or self.gids or self.exes or self.exe_sha256)

    def excludes(self, other: CallerRules) -> bool:
        """Whether no process can pass both rule sets.

        A process has one uid, one primary gid and one executable (so one
        hash): two sets exclude each other when both list the same kind of
        rule with no value in common. Rules of different kinds (a uid here,
        an executable there) can both admit one process.
        """
        return any(
            mine and theirs and set(mine).isdisjoint(theirs)
            for mine, theirs in (
                (self.uids, other.uids),
                (self.gids, other.gids),
                (self.exes, other.exes),
                (self.exe_sha256, other.exe_sha256),
            )
        )

    def refusal(self, caller: Caller | None) -> str | None:
        """None when ``caller`` passes every rule, else the failed rule in a sentence.

        The executable is attested only if a rule needs it, after the cheap
        uid and gid checks have passed.
        """
        if not self:
            return None
        if caller is None:
            return "the calling process is unknown"
        if self.uids and caller.uid not in self.uids:
            return f"uid {caller.uid} is not allowed (allow-uid {_listed(self.uids)})"
        if self.gids and caller.gid not in self.gids:
            return f"gid {caller.gid} is not allowed (allow-gid {_listed(self.gids)})"
        if not (self.exes or self.exe_sha256):
            return None
        try:
            exe = caller.executable()
        except AttestationError as exc:
            return f"the caller's executable could not be attested: {exc.message}"
        if self.exes and exe.path not in self.exes:
            return f"executable {exe.path} is not allowed (allow-exe {_listed(self.exes)})"
        if self.exe_sha256 and exe.sha256 not in self.exe_sha256:
            return (
                f"executable {exe.path} has SHA-256 {exe.sha256}, which is not allowed"
                f" (allow-exe-sha256 {_listed(self.exe_sha256)})"
            )
        return None

    def to_metadata(self) -> dict[str, list[Any]]:
        """The JSON form stored in an identity's metadata."""
        return {
            "uids": list(self.uids),
            "gids": list(self.gids),
            "exes": list(self.exes),
            "exe_sha256": list(self.exe_sha256),
        }

    @classmethod
    def from_metadata(cls, name: str, data: Any) -> CallerRules:
        """Rules read back from disk; anything malformed is refused, never dropped."""
        keys = ("uids", "gids", "exes", "exe_sha256")
        if not isinstance(data, Mapping) or not all(
            isinstance(data.get(k, []), list) for k in keys
        ):
            raise IdentityError(f"identity {name!r}: metadata field 'callers' is malformed")
        try:
            return cls(*(tuple(data.get(k, [])) for k in keys))
        except IdentityError as exc:
            raise IdentityError(f"identity {name!r}: {exc.message}") from None


NO_RULES = CallerRules()


class _Pattern(Protocol):
    def matches(self, host: str, port: int) -> bool: ...
    @property
    def specificity(self) -> tuple[int, int, int]: ...


class Candidate(Protocol):
    """What ``choose`` needs of an identity (``agent.identity.Identity`` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def hosts(self) -> Sequence[_Pattern]: ...
    @property
    def callers(self) -> CallerRules: ...


C = TypeVar("C", bound=Candidate)


def shown(host: str, port: int) -> str:
    """``host``, or ``host:port`` when the port is not https's: as messages name
    a target (an IPv6 address in brackets, as in a URL)."""
    if ":" in host:
        host = f"[{host}]"
    return host if port == 443 else f"{host}:{port}"


def choose(candidates: Sequence[C], host: str, port: int, caller: Caller | None) -> C:
    """The identity ``caller`` gets for ``host:port`` among ``candidates``.

    ``candidates`` are every identity bound to the host, most specific
    first. Raises PeerDenied when none admits the caller, or when two
    equally specific ones both do; its ``reason`` says which rules failed.
    """
    refusals: list[str] = []
    for _, level in itertools.groupby(candidates, key=lambda c: _rank(c, host, port)):
        admitted: list[C] = []
        for candidate in level:
            why = candidate.callers.refusal(caller)
            if why is None:
                admitted.append(candidate)
            else:
                refusals.append(f"identity '{candidate.name}': {why}")
        if len(admitted) == 1:
            return admitted[0]
        if admitted:
            names = " and ".join(f"'{c.name}'" for c in admitted)
            raise PeerDenied(
                f"No single identity for {shown(host, port)} admits this process.",
                reason=f"identities {names} both admit this caller for {shown(host, port)};"
                " give them rules that tell their callers apart",
            )
    raise PeerDenied(
        f"No identity for {shown(host, port)} admits this process.",
        reason="; ".join(refusals) or "no identity is bound to the host",
    )


def _rank(candidate: Candidate, host: str, port: int) -> tuple[int, int, int]:
    """How specifically ``candidate`` is bound to ``host:port`` (its best pattern)."""
    return max(p.specificity for p in candidate.hosts if p.matches(host, port))
