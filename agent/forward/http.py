"""HTTP/1.1 pieces of the relay that need no I/O: targets, heads, error bodies.

Every head the relay forwards is rebuilt here from parsed fields, never
copied as raw bytes: that is what keeps request smuggling and header
injection out, and it is why these functions are pure and fuzzable.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from http import HTTPStatus

from agent.errors import BadRequest, ProxyError

# Hop-by-hop fields (RFC 9110 §7.6.1) plus the ones the relay always sets
# itself (Host and the body framing), so they are never copied through.
NOT_COPIED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        # the agent's own error marker: an upstream must not pass for the agent
        b"mtls-agent-error",
    }
)

_LABEL = rb"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})"
_HOSTNAME = re.compile(rb"^" + _LABEL + rb"(?:\." + _LABEL + rb")*\.?$")
_PORT = re.compile(rb"^[0-9]{1,5}$")
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True, frozen=True)
class Target:
    """Where a request goes: the upstream host, port and request-target."""

    host: str
    port: int
    path: bytes

    @property
    def authority(self) -> bytes:
        """The upstream Host header: the port is left out when it is 443."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port == 443:
            return host.encode("ascii")
        return f"{host}:{self.port}".encode("ascii")


def parse_authority(raw: bytes) -> tuple[str, int]:
    """Host and port from a Host header or an absolute URI's authority.

    Userinfo, bad ports, stray characters and anything that is not a plain
    DNS name or IP literal are refused: the host picks the identity, so it
    must mean exactly one thing.
    """
    if not raw:
        raise BadRequest("The request names no host (empty Host header).")
    if b"@" in raw:
        raise BadRequest("The Host must not carry userinfo (user@host).")
    if raw.startswith(b"["):
        end = raw.find(b"]")
        if end < 0:
            raise BadRequest("The Host has an unclosed IPv6 bracket.")
        literal, rest = raw[1:end], raw[end + 1 :]
        if b"%" in literal:  # a zone names an interface of this machine, not a host
            raise BadRequest("The Host must not carry an IPv6 zone.")
        try:
            host = str(ipaddress.IPv6Address(literal.decode("ascii")))
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("The Host holds an invalid IPv6 address.") from None
        if rest and not rest.startswith(b":"):
            raise BadRequest("The Host has characters after its IPv6 address.")
        port_text = rest[1:] if rest else None
    else:
        name, sep, port_bytes = raw.rpartition(b":")
        if not sep:
            name, port_bytes = raw, b""
        port_text = port_bytes if sep else None
        if not _HOSTNAME.match(name):
            raise BadRequest("The Host is not a valid host name or address.")
        host = name.decode("ascii").lower().rstrip(".")
    return host, _port(port_text)


def _port(text: bytes | None) -> int:
    if text is None:
        return 443
    if not _PORT.match(text) or not 0 < int(text) < 65536:
        raise BadRequest("The Host has an invalid port.")
    return int(text)


def parse_target(url: bytes, host_header: bytes | None, method: bytes) -> Target:
    """The upstream target of a request in origin-form or absolute-form."""
    if method == b"CONNECT":
        raise BadRequest(
            "CONNECT is not supported: send plain HTTP to the agent, which speaks TLS upstream."
        )
    if url.startswith(b"/") or (url == b"*" and method == b"OPTIONS"):
        if host_header is None:
            raise BadRequest("The request has no Host header.")
        host, port = parse_authority(host_header)
        return Target(host, port, url)
    scheme, sep, rest = url.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise BadRequest("The request-target must be a path or an http:// URL.")
    slash = rest.find(b"/")
    query = rest.find(b"?")
    cut = min(i for i in (slash, query, len(rest)) if i >= 0)
    host, port = parse_authority(rest[:cut])
    path = rest[cut:] or b"/"
    if not path.startswith(b"/"):
        path = b"/" + path
    return Target(host, port, path)


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """The field names a Connection header marks as hop-by-hop."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens)


def copied_headers(headers: Headers) -> Headers:
    """The end-to-end fields of a head, in order, repeats kept."""
    listed = connection_tokens(headers)
    return [
        (name, value)
        for name, value in headers
        if (lower := name.lower()) not in NOT_COPIED and lower not in listed
    ]


def check_request_headers(headers: Headers) -> bytes | None:
    """The Host value, after refusing heads that two parsers could read apart.

    llhttp already rejects Content-Length beside Transfer-Encoding, repeated
    Content-Length, obs-fold and control characters; two Host fields and
    invalid field names are refused here.
    """
    host: bytes | None = None
    for name, _value in headers:
        if not _TOKEN.match(name):
            raise BadRequest("A header field name holds invalid characters.")
        if name.lower() == b"host":
            if host is not None:
                raise BadRequest("The request has more than one Host header.")
            host = _value
    return host


def encode_head(first_line: bytes, headers: Headers, extra: Headers) -> bytes:
    """One head: a first line, copied fields, then the relay's own fields."""
    parts = [first_line, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    for name, value in extra:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def status_line(status: int, reason: bytes) -> bytes:
    return b"HTTP/1.1 %d %s" % (status, reason or _reason(status))


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Unknown"


def error_response(error: ProxyError, *, close: bool) -> bytes:
    """The agent's own answer: never mistaken for the upstream's."""
    body = json.dumps({"error": error.code, "message": error.message}).encode("utf-8") + b"\n"
    headers = [
        (b"Content-Type", b"application/json"),
        (b"Mtls-Agent-Error", error.code.encode("ascii")),
        (b"Content-Length", str(len(body)).encode("ascii")),
        (b"Cache-Control", b"no-store"),
    ]
    if close:
        headers.append((b"Connection", b"close"))
    return encode_head(status_line(error.status, b""), [], headers) + body


def chunk(data: bytes) -> tuple[bytes, bytes, bytes]:
    """A chunk of a chunked body, as parts for writelines (no copy of data)."""
    return (b"%x\r\n" % len(data), data, b"\r\n")


def last_chunk(trailers: Headers) -> bytes:
    """The end of a chunked body, with the end-to-end trailer fields."""
    parts = [b"0\r\n"]
    for name, value in copied_headers(trailers):
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
