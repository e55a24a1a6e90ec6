"""Getting identities into the vault.

Every source (a PKCS#12 file today; a PKCS#12 URL and EST enrollment build
on the same path) ends in one ``Identity`` stored sealed by ``store_identity``,
so host-pattern ties are refused in one place, at import time, never guessed
at request time. Storing needs only the vault's public key: it works while
the agent is locked or not running.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agent.errors import IdentityError
from agent.identity import Identity, load_pkcs12, new_identity
from agent.keychain import read_identities
from agent.routing import conflicts
from agent.vault import Vault, check_name


def store_identity(vault: Vault, identity: Identity, key: Any, *, replace: bool = False) -> None:
    """Seal ``key`` and store ``identity``, refusing ties with other identities."""
    existing, _ = read_identities(vault)
    problems = conflicts(existing.values(), identity)
    if problems:
        raise IdentityError(f"cannot store '{identity.name}': " + "; ".join(problems) + ".")
    vault.store(identity.name, identity.to_metadata(), key, replace=replace)


def import_pkcs12(
    vault: Vault,
    name: str,
    data: bytes,
    password: bytes | None,
    hosts: Sequence[str],
    *,
    ca_pem: bytes | None = None,
    pins: Sequence[str] = (),
    min_tls: str = "1.2",
    source: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> Identity:
    """Parse a PKCS#12 blob, check it, and store it sealed in the vault."""
    check_name(name)
    if not vault.exists():
        raise IdentityError("There is no vault yet; create one with 'agentctl init'.")
    key, chain = load_pkcs12(data, password)
    identity = new_identity(
        name,
        key,
        chain,
        list(hosts),
        ca_pem=ca_pem,
        pins=tuple(pins),
        min_tls=min_tls,
        source=dict(source or {"kind": "pkcs12-file"}),
    )
    store_identity(vault, identity, key, replace=replace)
    return identity
