"""HTTP/1.1 pieces of the relay that need no I/O: targets, heads, error bodies.

Every head the relay forwards is rebuilt here from parsed fields, never
copied as raw bytes: that is what keeps request smuggling and header
injection out, and it is why these functions are pure and fuzzable.
"""

from __future__ import annotations

import functools
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

#: The longest DNS name in text, with the dot that may end it.
MAX_HOST_NAME = 254

#: Distinct Host values whose parse is kept (``origin_of``): a caller talks to
#: a handful of hosts, and a flood of new names only costs a parse each.
ORIGINS_CACHED = 4096

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True, frozen=True)
class Origin:
    """An upstream host and port, with the two ways the relay writes them."""

    host: str
    port: int
    #: The upstream Host header: the port is left out when it is 443.
    authority: bytes
    #: ``host:port``, as messages name the upstream.
    where: str


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
        if len(name) > MAX_HOST_NAME or not _HOSTNAME.match(name):
            raise BadRequest("The Host is not a valid host name or address.")
        host = name.decode("ascii").lower().rstrip(".")
    return host, _port(port_text)


def _port(text: bytes | None) -> int:
    if text is None:
        return 443
    if not _PORT.match(text) or not 0 < int(text) < 65536:
        raise BadRequest("The Host has an invalid port.")
    return int(text)


@functools.lru_cache(maxsize=ORIGINS_CACHED)
def origin_of(raw: bytes) -> Origin:
    """The origin a Host value names, parsed once per distinct value.

    A refused value raises ``BadRequest`` every time: errors are not cached.
    """
    host, port = parse_authority(raw)
    bracketed = f"[{host}]" if ":" in host else host
    authority = bracketed if port == 443 else f"{bracketed}:{port}"
    return Origin(host, port, authority.encode("ascii"), f"{bracketed}:{port}")


def parse_target(url: bytes, host_header: bytes | None, method: bytes) -> tuple[Origin, bytes]:
    """The upstream origin and path of a request in origin-form or absolute-form."""
    if method == b"CONNECT":
        raise BadRequest(
            "CONNECT is not supported: send plain HTTP to the agent, which speaks TLS upstream."
        )
    if url.startswith(b"/") or (url == b"*" and method == b"OPTIONS"):
        if host_header is None:
            raise BadRequest("The request has no Host header.")
        return origin_of(host_header), url
    scheme, sep, rest = url.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise BadRequest("The request-target must be a path or an http:// URL.")
    slash = rest.find(b"/")
    query = rest.find(b"?")
    cut = min(i for i in (slash, query, len(rest)) if i >= 0)
    origin = origin_of(rest[:cut])
    path = rest[cut:] or b"/"
    if not path.startswith(b"/"):
        path = b"/" + path
    return origin, path


def _listed(value: bytes, listed: set[bytes] | None) -> set[bytes] | None:
    """Add the field names a Connection value marks as hop-by-hop (beyond the
    ones never copied anyway) to ``listed``."""
    if value == b"keep-alive":  # what nearly every upstream sends
        return listed
    tokens = {t.strip().lower() for t in value.split(b",")} - NOT_COPIED
    if not tokens:
        return listed
    return tokens if listed is None else listed | tokens


#: A field as a line of a head, without its CRLF: b"Name: value".
_line = b": ".join


def _end_to_end(headers: Headers, listed: set[bytes]) -> list[bytes]:
    """The lines of the fields that are neither hop-by-hop nor listed by Connection."""
    return [
        _line(pair)
        for pair in headers
        if (lower := pair[0].lower()) not in NOT_COPIED and lower not in listed
    ]


def field_lines(headers: Headers) -> list[bytes]:
    """The end-to-end fields of a head as its lines, in order, repeats kept."""
    lines = []
    listed: set[bytes] | None = None
    for pair in headers:
        lower = pair[0].lower()
        if lower not in NOT_COPIED:
            lines.append(_line(pair))
        elif lower == b"connection":
            listed = _listed(pair[1], listed)
    return lines if not listed else _end_to_end(headers, listed)


def request_fields(
    headers: Headers,
) -> tuple[list[bytes], bytes | None, bytes | None, bytes | None]:
    """One pass over a request head: (its end-to-end field lines, Host, body framing, Upgrade).

    The framing is ``b"chunked"``, a Content-Length value (digits), or None. Heads
    that two parsers could read apart are refused: llhttp already rejects
    invalid field names, Content-Length beside Transfer-Encoding, repeated
    Content-Length, obs-fold and control characters; two Host fields and
    transfer codings other than chunked are refused here.
    """
    lines = []
    listed: set[bytes] | None = None
    host = framing = upgrade = None
    for pair in headers:
        lower = pair[0].lower()
        if lower not in NOT_COPIED:
            lines.append(_line(pair))
        elif lower == b"host":
            if host is not None:
                raise BadRequest("The request has more than one Host header.")
            host = pair[1]
        elif lower == b"transfer-encoding":
            # llhttp lets "gzip, chunked" through: relayed as plain chunks, the
            # upstream would take gzip bytes for the body itself
            if pair[1].strip().lower() != b"chunked":
                raise BadRequest("Only the chunked transfer coding is accepted on requests.")
            framing = b"chunked"
        elif lower == b"content-length":
            if not pair[1].isdigit():  # llhttp refuses these too; b"chunked" must stay unambiguous
                raise BadRequest("The Content-Length is not a number.")
            if framing is None:
                framing = pair[1]
        elif lower == b"upgrade":
            upgrade = pair[1]
        elif lower == b"connection":
            listed = _listed(pair[1], listed)
    if listed:
        lines = _end_to_end(headers, listed)
    return lines, host, framing, upgrade


def response_fields(headers: Headers) -> tuple[list[bytes], bytes | None, bytes | None]:
    """One pass over a response head: (its end-to-end field lines, Content-Length,
    transfer coding). The coding is None without Transfer-Encoding, ``b"chunked"``
    when every such field says just that, else the first field that does not."""
    lines = []
    listed: set[bytes] | None = None
    length = None
    coding = None
    for pair in headers:
        lower = pair[0].lower()
        if lower not in NOT_COPIED:
            lines.append(_line(pair))
        elif lower == b"content-length":
            length = pair[1]
        elif lower == b"transfer-encoding":
            value = pair[1].strip().lower()
            if coding is None or coding == b"chunked":
                coding = value
        elif lower == b"connection":
            listed = _listed(pair[1], listed)
    if listed:
        lines = _end_to_end(headers, listed)
    return lines, length, coding


def encode_head(first_line: bytes, lines: list[bytes]) -> bytes:
    """A head from its first line and its field lines."""
    return b"\r\n".join([first_line, *lines, b"\r\n"])


def request_head(
    method: bytes,
    path: bytes,
    authority: bytes,
    lines: list[bytes],
    framing: bytes | None,
    upgrade: bytes | None,
) -> bytes:
    """The head sent upstream: the caller's fields, then Host and the framing."""
    head = [b"%s %s HTTP/1.1" % (method, path), *lines, b"Host: " + authority]
    if framing == b"chunked":
        head.append(b"Transfer-Encoding: chunked")
    elif framing is not None:
        head.append(b"Content-Length: " + framing)
    if upgrade is not None:
        head += (b"Connection: upgrade", b"Upgrade: " + upgrade)
    head.append(b"\r\n")
    return b"\r\n".join(head)


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
    lines = [
        b"Content-Type: application/json",
        b"Mtls-Agent-Error: " + error.code.encode("ascii"),
        b"Content-Length: %d" % len(body),
        b"Cache-Control: no-store",
    ]
    if close:
        lines.append(b"Connection: close")
    return encode_head(status_line(error.status, b""), lines) + body


def chunk(data: bytes) -> tuple[bytes, bytes, bytes]:
    """A chunk of a chunked body, as parts for writelines (no copy of data)."""
    return (b"%x\r\n" % len(data), data, b"\r\n")


def last_chunk(trailers: Headers) -> bytes:
    """The end of a chunked body, with the end-to-end trailer fields."""
    return b"\r\n".join([b"0", *field_lines(trailers), b"\r\n"])
