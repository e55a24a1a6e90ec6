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
        """Every identity bound to ``host:port``, most specific first."""
        found = [i for p, i in self._exact.get(host, ()) if p.port is None or p.port == port]
        _, dot, parent = host.partition(".")
        if dot:
            found += [
                i for p, i in self._wildcard.get(parent, ()) if p.port is None or p.port == port
            ]
        return found


def conflicts(existing: Iterable[Identity], new: Identity) -> list[str]:
    """Sentences naming each host pattern that ``new`` would tie on."""
    taken = {str(p): i.name for i in existing if i.name != new.name for p in i.hosts}
    return [
        f"host pattern '{p}' is already bound to identity '{taken[str(p)]}'"
        for p in new.hosts
        if str(p) in taken
    ]
