"""HTTPS for enrollment: verified TLS, SPKI pins checked inside the handshake.

Enrollment talks to servers before mTLS protects anything, and what it sends
(a bearer token, a password) or receives (a PKCS#12 blob) is a secret. So a
pin is checked as the last step of the TLS handshake itself: a server whose
public key does not match never receives a single byte of the request, not
even its headers. Redirects are never followed (a token must not travel on
to another host), answers are bounded, and every failure of the layers
below (aiohttp, ssl, sockets) becomes one ``EnrollmentError`` sentence here,
at one boundary, naming the host but never a header, a query or a body.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from agent.errors import EnrollmentError
from agent.identity import check_pin, spki_pin

#: Enrollment answers are a few certificates or one PKCS#12 blob.
MAX_ANSWER_BYTES = 1 << 20
REQUEST_TIMEOUT = 30.0


class _PinMismatch(ssl.SSLCertVerificationError):
    """The server's certificate verified, but its public key is not pinned."""


class _PinnedSSLObject(ssl.SSLObject):
    """An ``SSLObject`` that fails its own handshake unless the peer is pinned.

    asyncio (and uvloop) drive the handshake through ``do_handshake`` and
    hand the connection to aiohttp only once it returns, so raising here is
    the point after which nothing could have been sent yet.
    """

    pins: frozenset[str] = frozenset()

    def do_handshake(self) -> None:
        super().do_handshake()
        der = self.getpeercert(binary_form=True)
        if der is None or spki_pin(der) not in self.pins:
            raise _PinMismatch("the server's public key matches none of the given pins")


def server_context(ca_pem: bytes | None) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca_pem`` (else the system)."""
    try:
        context = ssl.create_default_context(
            cadata=None if ca_pem is None else ca_pem.decode("ascii")
        )
    except (ssl.SSLError, UnicodeDecodeError, ValueError):
        raise EnrollmentError("the CA bundle for the server could not be loaded") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def pin_context(context: ssl.SSLContext, pins: Iterable[str]) -> ssl.SSLContext:
    """Make ``context`` refuse, inside the handshake, a server not matching ``pins``.

    No pins leaves the context as it is. ``context`` is changed in place, so
    pass one made for this purpose.
    """
    wanted = frozenset(check_pin(pin) for pin in pins)
    if wanted:
        context.sslobject_class = type("PinnedSSLObject", (_PinnedSSLObject,), {"pins": wanted})
    return context


def check_https_url(url: str, what: str) -> str:
    """``url`` if it is an absolute https URL with a host and no user info."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise EnrollmentError(f"the {what} URL is not a valid URL") from None
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise EnrollmentError(
            f"the {what} URL must start with https:// and name a host: what travels "
            "there is secret, so only verified TLS will do"
        )
    if parts.username is not None or parts.password is not None:
        raise EnrollmentError(
            f"the {what} URL must not carry a user name or password; use the options "
            "that read them from a file"
        )
    return url


def display_url(url: str) -> str:
    """``url`` fit for messages, logs and metadata: no query, no fragment.

    A registration link often carries a one-time secret in its query.
    """
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


@dataclass(frozen=True)
class Answer:
    """A server's answer, read whole (it is bounded)."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()

    def text_excerpt(self, limit: int = 200) -> str:
        """A short, printable excerpt of the body for an error message."""
        text = self.body[:limit].decode("utf-8", "replace")
        text = "".join(ch if ch.isprintable() else " " for ch in text)
        return " ".join(text.split())


async def request(
    method: str,
    url: str,
    context: ssl.SSLContext,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = REQUEST_TIMEOUT,
    max_bytes: int = MAX_ANSWER_BYTES,
) -> Answer:
    """One HTTPS request with ``context``; redirects are answers, not followed."""
    where = _where(url)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    try:
        async with (
            aiohttp.ClientSession(timeout=client_timeout, trust_env=False) as session,
            session.request(
                method,
                url,
                headers=dict(headers or {}),
                data=body,
                ssl=context,
                allow_redirects=False,
            ) as response,
        ):
            data = await _read_bounded(response, max_bytes, where)
            return Answer(response.status, dict(response.headers), data)
    except EnrollmentError:
        raise
    except TimeoutError:
        raise EnrollmentError(f"{where} did not answer within {timeout:g} s") from None
    except aiohttp.ClientConnectorCertificateError as exc:
        raise _certificate_error(where, exc.certificate_error) from None
    except aiohttp.ClientConnectorSSLError as exc:
        reason = getattr(exc.os_error, "reason", None) or "handshake failed"
        raise EnrollmentError(f"the TLS handshake with {where} failed ({reason})") from None
    except aiohttp.ClientConnectorError as exc:
        raise EnrollmentError(f"cannot connect to {where}: {_reason(exc.os_error)}") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise EnrollmentError(f"the connection to {where} failed ({type(exc).__name__})") from None


async def _read_bounded(response: aiohttp.ClientResponse, max_bytes: int, where: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > max_bytes:
            raise EnrollmentError(f"{where} answered more than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _certificate_error(where: str, exc: BaseException) -> EnrollmentError:
    if isinstance(exc, _PinMismatch):
        return EnrollmentError(
            f"the public key of {where} matches none of the given pins; nothing was sent"
        )
    reason = getattr(exc, "verify_message", None) or "verification failed"
    return EnrollmentError(
        f"the certificate of {where} is not trusted ({reason}); nothing was sent. "
        "Give the CA that signed it with --ca"
    )


def _reason(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "the connection was refused"
    if isinstance(exc, socket.gaierror):
        return "the host name could not be resolved"
    return (os.strerror(exc.errno) if exc.errno else type(exc).__name__).lower()


def _where(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc or url
