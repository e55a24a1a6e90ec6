"""Which identity a host gets: the most specific matching pattern wins.

Lookups are dictionary probes on the host and on its parent domain (a
wildcard covers exactly one label), so the cost per request does not grow
with the number of identities. Ties are refused when an identity is added
(``conflicts``), never guessed at request time.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.identity import HostPattern, Identity

_Entry = tuple[HostPattern, Identity]


class Router:
    """An immutable host → identity table, rebuilt whenever identities change."""

    def __init__(self, identities: Iterable[Identity]) -> None:
        exact: dict[str, list[_Entry]] = {}
        wildcard: dict[str, list[_Entry]] = {}
        for identity in identities:
            for pattern in identity.hosts:
                if pattern.wildcard:
                    wildcard.setdefault(pattern.host[2:], []).append((pattern, identity))
                else:
                    exact.setdefault(pattern.host, []).append((pattern, identity))
        for table in (exact, wildcard):
            for entries in table.values():
                entries.sort(key=lambda e: (e[0].specificity, e[1].name), reverse=True)
        self._exact = exact
        self._wildcard = wildcard

    def candidates(self, host: str, port: int) -> list[Identity]:
        """Every identity bound to ``host:port``, most specific first, each once.

        An identity may match through two of its patterns (``api.example.com``
        and ``*.example.com``); it is listed at its most specific one.
        """
        found: list[Identity] = []
        _add(found, self._exact.get(host, ()), port)
        _, dot, parent = host.partition(".")
        if dot:
            _add(found, self._wildcard.get(parent, ()), port)
        return found


def _add(found: list[Identity], entries: Iterable[_Entry], port: int) -> None:
    for pattern, identity in entries:
        if (pattern.port is None or pattern.port == port) and all(
            identity is not seen for seen in found
        ):
            found.append(identity)


#: What makes two identities' caller rules tell their callers apart (``CallerRules.excludes``).
_APART = (
    " of one kind (allow-uid, allow-gid, allow-exe or allow-exe-sha256) with no value in common"
)


def conflicts(existing: Iterable[Identity], new: Identity) -> list[str]:
    """Sentences naming each host pattern that ``new`` would tie on.

    Two identities may share a pattern when their caller rules exclude each
    other: they are meant for different callers, and each request goes to
    the one whose rules admit its caller (``agent.policy.choose``). Rules
    that one process could pass both would make a tie at request time.
    """
    others = [i for i in existing if i.name != new.name]
    problems = []
    for pattern in new.hosts:
        for other in others:
            if pattern not in other.hosts or new.callers.excludes(other.callers):
                continue
            if not (new.callers and other.callers):
                why = "; two identities may share a pattern only when both have caller rules"
                why += _APART
            elif new.callers == other.callers:
                why = " with the same caller rules"
            else:
                why = f" with caller rules one process could pass both; give both rules{_APART}"
            problems.append(
                f"host pattern '{pattern}' is already bound to identity '{other.name}'{why}"
            )
    return problems
