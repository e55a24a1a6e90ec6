"""Getting identities into the vault.

Every source (a PKCS#12 file, a PKCS#12 URL, EST enrollment and its
renewals) ends in one ``Identity`` stored sealed by ``store_identity``, so
host-pattern ties are refused in one place, at import time, never guessed
at request time. Storing needs only the vault's public key: it works while
the agent is locked or not running.

EST enrollment seals the new key *before* the request leaves: the vault
first holds a pending record (the sealed key and the CSR, no certificate;
never routed), which the certificate then completes. A process that dies
in between loses nothing: running the same enrollment again re-sends the
stored CSR, which is also how a server that answers "202, come back later"
is waited out across runs. A definite refusal or an unusable answer removes
the pending record again, leaving the vault as it was.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent import est
from agent.errors import EnrollmentError, EnrollmentPending, IdentityError
from agent.identity import (
    PENDING_FORMAT,
    HostPattern,
    Identity,
    PrivateKey,
    load_pkcs12,
    new_identity,
)
from agent.keychain import read_identities
from agent.policy import NO_RULES, CallerRules
from agent.routing import conflicts
from agent.vault import Vault, check_name
from agent.webclient import (
    check_https_url,
    display_url,
    pin_context,
    request,
    server_context,
)

PENDING_VERSION = 1
#: ``upstream_ca`` values of an EST enrollment besides a PEM bundle.
UPSTREAM_FROM_CACERTS = "cacerts"
UPSTREAM_SYSTEM = "system"


def store_identity(
    vault: Vault, identity: Identity, key: Any | None, *, replace: bool = False
) -> None:
    """Seal ``key`` and store ``identity``, refusing ties with other identities.

    ``key=None`` completes a pending EST enrollment: the key sealed for it
    is already in the vault and is kept; only the metadata is written.
    """

    def refuse_ties() -> None:
        existing, _ = read_identities(vault)
        problems = conflicts(existing.values(), identity)
        if problems:
            raise IdentityError(f"cannot store '{identity.name}': " + "; ".join(problems) + ".")

    refuse_ties()  # early, for a clear error before the vault is locked for writing
    if key is not None:
        vault.store(identity.name, identity.to_metadata(), key, replace=replace, check=refuse_ties)
    elif _pending_metadata(vault, identity.name) is not None:
        vault.update_metadata(identity.name, identity.to_metadata(), check=refuse_ties)
    else:
        raise IdentityError(f"'{identity.name}' has no pending enrollment to complete.")


class _Claim(NamedTuple):
    """Host patterns a future identity will hold (what ``conflicts`` reads)."""

    name: str
    hosts: tuple[HostPattern, ...]
    callers: CallerRules = NO_RULES


def check_can_store(
    vault: Vault,
    name: str,
    hosts: Sequence[str],
    *,
    replace: bool,
    taken_hint: str = "use --replace to overwrite it",
    callers: CallerRules = NO_RULES,
) -> None:
    """Refuse early what storing would refuse late: no vault, a taken name,
    a host tie. Checked before any network call, so a one-time token or a
    CA's issuance is not spent on an identity that cannot be kept."""
    check_name(name)
    if not vault.exists():
        raise IdentityError("There is no vault yet; create one with 'agentctl init'.")
    if not hosts:
        raise IdentityError("give at least one --host pattern")
    if not replace and name in vault.names():
        raise IdentityError(f"an identity named '{name}' already exists; {taken_hint}.")
    claim = _Claim(name, tuple(dict.fromkeys(HostPattern.parse(h) for h in hosts)), callers)
    existing, _ = read_identities(vault)
    problems = conflicts(existing.values(), claim)  # type: ignore[arg-type]
    if problems:
        raise IdentityError(f"cannot store '{name}': " + "; ".join(problems) + ".")


# --- PKCS#12: a file, or a URL -----------------------------------------------------


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
    callers: CallerRules = NO_RULES,
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
        callers=callers,
    )
    store_identity(vault, identity, key, replace=replace)
    return identity


def set_caller_rules(vault: Vault, name: str, callers: CallerRules) -> Identity:
    """Give a stored identity new caller rules; its key and certificate stay.

    Refused when it would leave two identities sharing a host pattern
    without rules that tell their callers apart.
    """
    current = Identity.from_metadata(name, vault.read_metadata(name))
    updated = dataclasses.replace(current, callers=callers)
    existing, _ = read_identities(vault)
    problems = conflicts(existing.values(), updated)
    if problems:
        raise IdentityError(f"cannot change the rules of '{name}': " + "; ".join(problems) + ".")
    vault.update_metadata(name, updated.to_metadata())
    return updated


async def fetch_pkcs12(
    url: str, token: bytes, *, ca_pem: bytes | None = None, pins: Sequence[str] = ()
) -> bytes:
    """The PKCS#12 blob a registration service hands out behind a bearer token.

    The TLS peer is verified (``ca_pem``, else the system store) and, with
    ``pins``, must hold a pinned key before the token is sent at all.
    """
    check_https_url(url, "PKCS#12")
    authorization = est.bearer_authorization(token)
    context = pin_context(server_context(ca_pem), pins)
    where = display_url(url)
    answer = await request(
        "GET",
        url,
        context,
        headers={"Authorization": authorization, "Accept": "application/x-pkcs12"},
    )
    if answer.status in (401, 403):
        raise EnrollmentError(
            f"the registration server {where} refused the token (HTTP {answer.status});"
            " check the token file, or ask for a new token"
        )
    if answer.status != 200:
        raise EnrollmentError(f"the registration server {where} answered HTTP {answer.status}")
    if not answer.body:
        raise EnrollmentError(f"the registration server {where} sent an empty answer")
    return answer.body


# --- EST -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EstEnrollment:
    """What ``agentctl enroll NAME --est URL ...`` asks for.

    ``upstream_ca`` is the identity's trust for its upstreams: the CA
    certificates the EST server publishes (``"cacerts"``, the default),
    ``"system"``, or a PEM bundle. ``server_ca_pem``/``server_pins`` are
    for the EST server itself and are kept for renewals; ``authorization``
    (Basic or bearer) is used once and never stored.
    """

    name: str
    url: str
    hosts: tuple[str, ...]
    subject: str | None = None
    sans: tuple[str, ...] = ()
    key_type: str = est.DEFAULT_KEY_TYPE
    server_ca_pem: bytes | None = None
    server_pins: tuple[str, ...] = ()
    authorization: str | None = field(default=None, repr=False)
    upstream_ca: bytes | str = UPSTREAM_FROM_CACERTS
    upstream_pins: tuple[str, ...] = ()
    min_tls: str = "1.2"
    #: Seconds to keep asking while the server answers 202.
    wait: float = 300.0
    callers: CallerRules = NO_RULES


def _pending_metadata(vault: Vault, name: str) -> dict[str, Any] | None:
    """The pending-enrollment record stored under ``name``, if that is what is there."""
    if name not in vault.names():
        return None
    metadata = vault.read_metadata(name)
    return metadata if metadata.get("format") == PENDING_FORMAT else None


def _discard_pending(vault: Vault, name: str) -> None:
    if _pending_metadata(vault, name) is not None:
        vault.remove(name)


def _pem_bundle(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def _upstream_trust(upstream_ca: bytes | str, cacerts: Sequence[x509.Certificate]) -> bytes | None:
    if upstream_ca == UPSTREAM_FROM_CACERTS:
        return _pem_bundle(cacerts)
    if upstream_ca == UPSTREAM_SYSTEM:
        return None
    if isinstance(upstream_ca, bytes):
        return upstream_ca
    raise IdentityError(f"unknown upstream trust {upstream_ca!r}")


async def enroll_est(
    vault: Vault, order: EstEnrollment, progress: est.Progress | None = None
) -> Identity:
    """Enroll ``order.name`` with an EST server; the key is made here and stays.

    Resumes a pending enrollment of the same name with its stored CSR.
    Raises ``EnrollmentPending`` (the pending record kept) when the server
    has not issued within ``order.wait``.
    """
    pending = _pending_metadata(vault, order.name)
    check_can_store(
        vault,
        order.name,
        order.hosts,
        replace=pending is not None,
        taken_hint=f"renew it with 'agentctl renew {order.name}', or remove it first",
        callers=order.callers,
    )
    url = est.est_url(check_https_url(order.url, "EST"))
    context = pin_context(server_context(order.server_ca_pem), order.server_pins)
    server = est.EstServer(url, context, order.authorization)
    cacerts = await server.cacerts()
    if pending is None:
        subject = est.parse_subject(order.subject or f"CN={order.name}")
        sans = [est.parse_san(san) for san in order.sans]
        key = est.generate_key(order.key_type)
        csr_der = est.build_csr(key, subject, sans)
        record = {
            "format": PENDING_FORMAT,
            "version": PENDING_VERSION,
            "csr": base64.b64encode(csr_der).decode("ascii"),
            "requested": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        await asyncio.to_thread(vault.store, order.name, record, key)  # before the CSR leaves
        del key
    else:
        csr_der = base64.b64decode(pending.get("csr", ""))
        if progress is not None:
            progress(
                f"resuming the pending enrollment of '{order.name}' (key and request made"
                f" {pending.get('requested', 'earlier')})"
            )
    csr = est.load_csr(csr_der)
    try:
        certs = await server.enroll(csr_der, wait=order.wait, progress=progress)
        chain = est.issued_chain(csr.public_key(), csr.subject, certs, cacerts)
        identity = new_identity(
            order.name,
            csr.public_key(),
            chain,
            list(order.hosts),
            ca_pem=_upstream_trust(order.upstream_ca, cacerts),
            pins=order.upstream_pins,
            min_tls=order.min_tls,
            source=_est_source(order, url, est.key_type_of(csr.public_key())),
            callers=order.callers,
        )
    except EnrollmentPending:
        raise
    except (EnrollmentError, IdentityError):
        await asyncio.to_thread(_discard_pending, vault, order.name)
        raise
    await asyncio.to_thread(store_identity, vault, identity, None)
    return identity


def _est_source(order: EstEnrollment, url: str, key_type: str) -> dict[str, Any]:
    """What renewal needs later. Never a password or a token."""
    if order.upstream_ca in (UPSTREAM_FROM_CACERTS, UPSTREAM_SYSTEM):
        upstream = order.upstream_ca
    else:
        upstream = "custom"
    return {
        "kind": "est",
        "url": url,
        "server_ca_pem": None if order.server_ca_pem is None else _canonical(order.server_ca_pem),
        "server_pins": list(order.server_pins),
        "key_type": key_type,
        "upstream_ca": upstream,
    }


def _canonical(pem: bytes) -> str:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise EnrollmentError("the CA bundle for the EST server holds no PEM certificate") from None
    return _pem_bundle(certs).decode("ascii")


def est_server_trust(identity: Identity) -> bytes | None:
    """The CA bundle that verifies ``identity``'s EST server (None: the system's)."""
    pem = identity.source.get("server_ca_pem")
    return pem.encode("ascii") if isinstance(pem, str) else None


def renewal_key_type(identity: Identity) -> str:
    """The kind of key a renewal makes: the one chosen at enrollment."""
    key_type = identity.source.get("key_type")
    if key_type in est.KEY_TYPES:
        return str(key_type)
    return est.key_type_of(identity.leaf.public_key())


async def renew_est(
    vault: Vault,
    identity: Identity,
    client_context: ssl.SSLContext,
    key: PrivateKey,
    *,
    wait: float = 0.0,
    progress: est.Progress | None = None,
) -> Identity:
    """Renew an EST identity with a fresh ``key`` through simplereenroll.

    ``client_context`` presents the current identity (mTLS is the
    authentication) and trusts the EST server. The renewed identity keeps
    the name, hosts, pins and settings, is stored sealed in place of the
    old one (one atomic rename), and is returned; the caller swaps it in.
    """
    source = identity.source
    if source.get("kind") != "est" or not isinstance(source.get("url"), str):
        raise EnrollmentError(
            f"identity '{identity.name}' did not come from EST, so it cannot be renewed;"
            " import or enroll a new one with --replace"
        )
    pins = source.get("server_pins") or []
    server = est.EstServer(source["url"], pin_context(client_context, pins))
    cacerts = await server.cacerts()
    certs = await server.enroll(
        est.renewal_request(key, identity.leaf), renew=True, wait=wait, progress=progress
    )
    chain = est.issued_chain(key.public_key(), identity.leaf.subject, certs, cacerts)
    if source.get("upstream_ca") == UPSTREAM_FROM_CACERTS:
        ca_pem = _pem_bundle(cacerts)
    else:
        ca_pem = identity.ca_pem
    renewed = new_identity(
        identity.name,
        key,
        chain,
        [str(host) for host in identity.hosts],
        ca_pem=ca_pem,
        pins=identity.pins,
        min_tls=identity.min_tls,
        source=dict(source),
        callers=identity.callers,
    )
    await asyncio.to_thread(_replace_if_unchanged, vault, identity, renewed, key)
    return renewed


def _replace_if_unchanged(vault: Vault, old: Identity, new: Identity, key: PrivateKey) -> None:
    """Store ``new`` unless ``old`` was replaced or removed meanwhile (an
    import or a new enrollment under the same name wins over a renewal)."""
    try:
        current = Identity.from_metadata(old.name, vault.read_metadata(old.name))
    except IdentityError:
        current = None
    if current != old:
        raise EnrollmentError(
            f"identity '{old.name}' changed in the vault during its renewal; the renewal"
            " was not stored"
        )
    store_identity(vault, new, key, replace=True)
