"""The data plane: a protocol-level HTTP/1.1 relay from a Unix socket to mTLS.

Each client connection is an ``asyncio.Protocol`` parsing with llhttp
(httptools); each request becomes an ``Exchange`` that owns one pooled
upstream connection until its answer is complete. Bytes are relayed as they
arrive, never collected whole, and each side's reading is paused while the
other side's write buffer is full. Heads are rebuilt from parsed fields.
DESIGN.md ("The data plane's engine") says why this shape and not aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from contextlib import suppress

import httptools

from agent.audit import AuditLog
from agent.config import Limits
from agent.errors import (
    BadRequest,
    ClientGone,
    ClientStalled,
    HeadersTooLarge,
    Locked,
    PeerDenied,
    ProxyError,
    UpstreamBadResponse,
    UpstreamCut,
    UpstreamTimeout,
    UpstreamUnreachable,
    UriTooLong,
)
from agent.forward.deadline import Deadline
from agent.forward.http import (
    Headers,
    Origin,
    chunk,
    encode_head,
    error_response,
    field_lines,
    last_chunk,
    parse_target,
    request_fields,
    request_head,
    response_fields,
    status_line,
)
from agent.forward.upstream import Pool, UpstreamConnection
from agent.keychain import Keychain, LoadedIdentity
from agent.peer import Caller, caller_of

log = logging.getLogger(__name__)

# Why a client's reading is paused; reading resumes when no reason is left.
_CONNECTING = 1
_UPSTREAM_FULL = 2
_QUEUED = 4
_UPGRADING = 8
_REFUSED = 16

# Requests that may be sent again after a pooled connection died under them.
_SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})

# How a response body is framed towards the client.
_NO_BODY, _LENGTH, _CHUNKED, _UNTIL_CLOSE = range(4)


class ProxyServer:
    """Shared state of the proxy socket: routing, the pool, live clients."""

    def __init__(
        self,
        keychain: Keychain,
        limits: Limits,
        allowed_uids: frozenset[int],
        audit: AuditLog | None = None,
    ) -> None:
        self.keychain = keychain
        self.audit = audit
        self.limits = limits
        self.allowed_uids = allowed_uids
        self.pool = Pool(limits)
        #: The shortest delay a client's deadline is set to (see ``Deadline``).
        self.horizon = min(
            limits.head_timeout,
            limits.keepalive_idle,
            limits.response_timeout,
            limits.body_idle_timeout,
        )
        keychain.on_unload(self._unloaded)
        self.clients: set[ClientConnection] = set()
        self.requests_served = 0

    def __call__(self) -> ClientConnection:
        return ClientConnection(self)

    def _unloaded(self, dropped: list[LoadedIdentity], locking: bool) -> None:
        """Close idle connections of dropped identities; after a lock, busy ones too.

        A lock means no request may go on with those contexts (a TLS 1.3
        server could still ask one to sign): answers and tunnels under way
        are cut. A renewal swap lets them finish on the old identity.
        """
        self.pool.retire(dropped)
        if not locking:
            return
        gone = set(dropped)
        for client in list(self.clients):
            exchange = client.active
            if exchange is not None and exchange.loaded in gone:
                exchange.fail(Locked())
                if client.tunnel is not None:
                    client.abort()

    def busy(self) -> bool:
        """Whether a request or tunnel is under way: polled by the idle lock,
        so that counting costs the relay nothing per request. An exchange that
        has ended, on a connection still closing, is not use."""
        for client in self.clients:
            exchange = client.active
            if exchange is not None and not exchange.done:
                return True
            if client.tunnel is not None and not client.transport.is_closing():  # type: ignore[union-attr]
                return True
        return False

    def close(self) -> None:
        for client in list(self.clients):
            client.close()
        self.pool.close()


class ClientConnection(asyncio.Protocol):
    """One local caller: parses its requests and answers them in order.

    Its one deadline serves the connection and the exchange being answered:
    the head, the response, the body and the keep-alive wait in turn.
    """

    __slots__ = (
        "_client_eof", "_corked", "_headers", "_in_head", "_paused", "_queue",
        "_raw_head_bytes", "_read_size", "_receiving", "_reject", "_url",
        "_writing_paused", "active", "caller", "closed", "denied", "limits",
        "loop", "parser", "server", "timer", "transport", "tunnel",
    )  # fmt: skip

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.limits = server.limits
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.caller: Caller | None = None
        #: Why this caller may not use the proxy socket at all (its uid), or None.
        self.denied: str | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.timer = Deadline(self.loop, self._timed_out, server.horizon)
        self.closed = False
        self.tunnel: UpstreamConnection | None = None
        self._paused = 0
        self._writing_paused = False
        self._corked: list[bytes] | None = None
        # the head being parsed
        self._url = b""
        self._headers: Headers = []
        self._in_head = False
        self._read_size = 0
        self._raw_head_bytes = 0
        self._reject: ProxyError | None = None
        self._client_eof = False
        # exchanges: the one being answered, the ones waiting, the one receiving a body
        self.active: Exchange | None = None
        self._queue: deque[Exchange] = deque()
        self._receiving: Exchange | None = None

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        caller = self.caller = caller_of(transport.get_extra_info("socket"))
        if caller is None or caller.uid not in self.server.allowed_uids:
            who = "an unknown process" if caller is None else f"uid {caller.uid}"
            self.denied = f"{who} is not let in on the proxy socket (proxy.allow_uids)"
        self.server.clients.add(self)
        self.timer.set(self.limits.keepalive_idle)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.transport.write(data)  # type: ignore[union-attr]
            return
        if self._paused & (_UPGRADING | _REFUSED):
            return  # nothing may follow an upgrade request, or a refused one
        self._read_size = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade_requested(data[upgrade.args[0] :])
        except httptools.HttpParserError as exc:
            self._refuse(self._reject or _malformed(exc))
            return
        if self._in_head:
            # llhttp holds an unfinished field without calling back, so bound the
            # raw bytes too: a head that began in this read counts what is parsed
            # of it; each later read belongs to it whole.
            if self._raw_head_bytes < 0:
                # the head began in this read: its time runs from now (a head
                # that arrives whole in one read never needs the timer)
                self._raw_head_bytes = len(self._url) + _fields_size(self._headers)
                if self.active is None:
                    self.timer.set(self.limits.head_timeout)
            else:
                self._raw_head_bytes += len(data)
            if self._raw_head_bytes > self.limits.request_line + self.limits.header_bytes:
                self._refuse(self._head_too_large())

    def eof_received(self) -> bool:
        """The client has sent all it will: answer what it asked, then close.

        A client that half-closes after its request (``nc -N``, some scripts)
        still gets its answer; one that stops mid-head or mid-body is gone.
        """
        if (
            self.active is None
            or self._in_head
            or self._receiving is not None
            or self.tunnel is not None
        ):
            return False  # nothing left to answer, a request left unfinished, or a tunnel
        self._client_eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.timer.close()
        self.server.clients.discard(self)
        if self.active is not None:
            self.active.client_gone()
        if self.tunnel is not None:
            self.tunnel.close()

    def pause_writing(self) -> None:
        self._writing_paused = True
        upstream = self._upstream()
        if upstream is not None:
            upstream.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self._writing_paused = False
        upstream = self._upstream()
        if upstream is not None:
            upstream.transport.resume_reading()  # type: ignore[union-attr]

    # --- llhttp callbacks (request) ---

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._raw_head_bytes = -1  # counted after this read (see data_received)
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        # the whole line counts ("GET " + target + " HTTP/1.1"); the method is
        # only looked up for the rare target that comes near the limit
        if len(self._url) > self.limits.request_line - _LONGEST_LINE_REST and self._line_too_long():
            raise self._rejecting(
                UriTooLong(f"The request line is longer than {self.limits.request_line} bytes.")
            )

    def _line_too_long(self) -> bool:
        method = self.parser.get_method()
        return len(method) + 1 + len(self._url) + _VERSION_PART > self.limits.request_line

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:  # a trailer field after a chunked body
            receiving = self._receiving
            if receiving is not None:
                receiving.trailers.append((name, value))
                receiving.trailer_bytes += len(name) + len(value) + 4
                limits = self.limits
                if (
                    receiving.trailer_bytes > limits.header_bytes
                    or len(receiving.trailers) > limits.header_fields
                ):
                    raise self._rejecting(
                        HeadersTooLarge(
                            f"The request's trailer fields exceed {limits.header_bytes} bytes "
                            f"or {limits.header_fields} fields."
                        )
                    )
            return
        headers = self._headers
        headers.append((name, value))
        if len(headers) > self.limits.header_fields:
            raise self._rejecting(self._head_too_large())

    def on_headers_complete(self) -> None:
        self._in_head = False
        # the fields are only added up when the head spanned reads, or its one
        # read could hold more than the limit (a field counts one byte more
        # than its shortest form on the wire, "name:value\r\n")
        limit = self.limits.header_bytes
        headers = self._headers
        could_exceed = self._raw_head_bytes >= 0 or self._read_size + len(headers) > limit
        if could_exceed and _fields_size(headers) > limit:
            raise self._rejecting(self._head_too_large())
        exchange = Exchange(self, self._url, self._headers)
        self._receiving = exchange
        if self.active is None:
            self.timer.cancel()
            self.active = exchange
            exchange.start()
        else:  # pipelined: answered in order once the one before is done
            self._queue.append(exchange)
            self.pause(_QUEUED)

    def on_body(self, body: bytes) -> None:
        if self._receiving is not None:
            self._receiving.request_body(body)

    def on_message_complete(self) -> None:
        receiving, self._receiving = self._receiving, None
        if receiving is not None:
            receiving.request_complete()

    # --- used by exchanges ---

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if self._corked is not None:
            self._corked.append(data)
        else:
            self.transport.write(data)  # type: ignore[union-attr]

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        if self.closed:
            return
        if self._corked is not None:
            self._corked.extend(parts)
        else:
            self.transport.writelines(parts)  # type: ignore[union-attr]

    def cork(self) -> None:
        """Hold writes until ``uncork``: what one upstream read produces (head,
        body, end of chunks) leaves in one system call, not one each."""
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        parts, self._corked = self._corked, None
        if parts and not self.closed:
            self.transport.writelines(parts)  # type: ignore[union-attr]

    def pause(self, reason: int) -> None:
        if not self._paused and not self.closed:
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._paused |= reason

    def resume(self, reason: int) -> None:
        was = self._paused
        self._paused &= ~reason
        if was and not self._paused and not self.closed:
            self.transport.resume_reading()  # type: ignore[union-attr]

    def exchange_done(self, exchange: Exchange, close: bool) -> None:
        self.server.requests_served += 1
        self.active = None
        if close or self.closed:
            self.close()
            return
        if self._queue:
            self.active = self._queue.popleft()
            if not self._queue:
                self.resume(_QUEUED)
            # not from inside the previous answer's parser callback, where an
            # exception would be charged to the exchange that already ended
            self.loop.call_soon(self.active.start)
        elif self._client_eof:
            self.close()
        else:
            idle = self.limits.head_timeout if self._in_head else self.limits.keepalive_idle
            self.timer.set(idle)

    def start_tunnel(self, upstream: UpstreamConnection, client_bytes: bytes) -> None:
        """After a 101: from now on both sides are relayed as raw bytes."""
        self.tunnel = upstream
        self.timer.cancel()
        if client_bytes:
            upstream.transport.write(client_bytes)  # type: ignore[union-attr]
        self.resume(_UPGRADING)

    def close(self) -> None:
        """Close after what is already written has been sent."""
        if not self.closed:
            self.uncork()
            self.closed = True
            self.transport.close()  # type: ignore[union-attr]

    def abort(self) -> None:
        """Cut the connection: the client must not take a partial body as whole."""
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    # --- internals ---

    def _upstream(self) -> UpstreamConnection | None:
        if self.tunnel is not None:
            return self.tunnel
        if self.active is not None:
            return self.active.upstream
        return None

    def _rejecting(self, error: ProxyError) -> ProxyError:
        self._reject = error
        return error

    def _head_too_large(self) -> ProxyError:
        if not self._headers and self._url and self._line_too_long():
            return UriTooLong(f"The request line is longer than {self.limits.request_line} bytes.")
        return HeadersTooLarge(
            f"The request head exceeds {self.limits.header_bytes} bytes or "
            f"{self.limits.header_fields} fields."
        )

    def _refuse(self, error: ProxyError) -> None:
        """A request we cannot parse: answer (unless another answer is under way), close.

        A body that breaks its framing after its head went upstream fails its
        exchange: the upstream connection is aborted, so the upstream never
        takes the part it got for a whole request.
        """
        self._in_head = False
        self.pause(_REFUSED)
        self._queue.clear()
        receiving, self._receiving = self._receiving, None
        if receiving is not None and receiving is self.active:
            self.active.close_client = True
            self.active.fail(error)
            return
        if self.active is None:
            self.write(error_response(error, close=True))
            self.close()
        else:  # let the answer in progress finish, then close
            self.active.close_client = True
        if receiving is not None:
            receiving._audit(error)  # queued behind the answer in progress: never started
        else:
            self._audit_refused_head(error)

    def _audit_refused_head(self, error: ProxyError) -> None:
        """The audit line of a head refused before it made an exchange: with
        what was parsed of it (the method once the URL began, the target when
        its one Host says so)."""
        audit = self.server.audit
        if audit is None:
            return
        method = self.parser.get_method() if self._url else None
        origin, path = _named_target(self._url, self._headers, method or b"GET")
        audit.request(
            None,
            method,
            None if origin is None else origin.host,
            None if origin is None else origin.port,
            path or None,
            error.status,
            0,
            0,
            0.0,
            self.caller,
            error,
        )

    def _upgrade_requested(self, rest: bytes) -> None:
        """llhttp stops at an upgrade (or CONNECT): nothing after it is HTTP any more."""
        exchange = self.active if not self._queue else self._queue[-1]
        if exchange is None or exchange.done:
            # already answered with an error: llhttp would read no further request
            # on this connection, so a client waiting for one must not wait in vain
            self.close()
            return
        if exchange.upgrade is not None and exchange.error is None:
            exchange.upgrade_bytes = rest
        else:  # e.g. CONNECT: its error answer ends the connection
            exchange.close_client = True
        self.pause(_UPGRADING)

    def _timed_out(self) -> None:
        if self.active is not None:
            self.active.timed_out()
        else:  # idle keep-alive, or a head that did not arrive in time: just close
            self.close()


def _malformed(exc: httptools.HttpParserError) -> BadRequest:
    reason = str(exc).rstrip(".")
    if "PRI/Upgrade" in reason:  # llhttp stops at HTTP/2's connection preface
        return BadRequest("HTTP/2 is not spoken on the proxy socket: send HTTP/1.1.")
    return BadRequest(f"The request is malformed: {reason}.")


def _named_target(url: bytes, headers: Headers, method: bytes) -> tuple[Origin | None, bytes]:
    """Where a refused head was going, for its audit line: the origin when
    its one Host (or its URL) says so, and the path."""
    hosts = [value for name, value in headers if name.lower() == b"host"]
    if len(hosts) < 2:
        with suppress(BadRequest):
            return parse_target(url, hosts[0] if hosts else None, method)
    return None, url


#: " HTTP/1.1", the end of a request line.
_VERSION_PART = 9
#: At least what a request line adds to its target: a method longer than
#: any llhttp takes (UNSUBSCRIBE, 11 letters), a space, the version.
_LONGEST_LINE_REST = 16 + _VERSION_PART


def _fields_size(headers: Headers) -> int:
    """A head's fields as counted against ``limits.header_bytes``."""
    return sum(len(name) + len(value) + 4 for name, value in headers)


class Exchange:
    """One request and its answer: routing, the upstream, and the relay."""

    __slots__ = (
        "_audited", "_body_started", "_connect_task", "_framing", "_got_response_bytes",
        "_interim", "_pooled", "_response_head_bytes", "_response_headers",
        "_response_in_head", "_response_read", "_response_trailer_bytes",
        "_response_trailers", "_reused",
        "_status_reason", "_upstream_until_close", "body_framing", "bytes_in", "bytes_out",
        "client", "close_client", "done", "error", "head_sent", "headers", "limits", "loaded",
        "method", "origin", "path", "pending", "request_done", "response", "server",
        "started", "status", "timer", "trailer_bytes", "trailers", "upgrade",
        "upgrade_bytes", "upstream",
        "version_10",
    )  # fmt: skip

    def __init__(self, client: ClientConnection, url: bytes, headers: Headers) -> None:
        self.client = client
        self.server = client.server
        self.limits = client.limits
        self.timer = client.timer
        parser = client.parser
        self.method: bytes = parser.get_method()
        version = parser.get_http_version()
        self.version_10 = version == "1.0"
        self.close_client = self.version_10 or not parser.should_keep_alive()
        self.upgrade: bytes | None = None
        self.upgrade_bytes = b""
        self.error: ProxyError | None = None
        self.origin: Origin | None = None
        self.path: bytes | None = None
        #: The caller's end-to-end fields, as head lines.
        self.headers: list[bytes] = []
        self.body_framing: bytes | None = None  # b"chunked" or a Content-Length
        self.trailers: Headers = []
        self.trailer_bytes = 0
        self.pending: list[bytes] = []
        self.request_done = False
        self.loaded: LoadedIdentity | None = None
        self.started = time.monotonic()
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._audited = False
        self.upstream: UpstreamConnection | None = None
        self.done = False
        self.head_sent = False
        self._connect_task: asyncio.Task[None] | None = None
        self._reused = False
        self._pooled: UpstreamConnection | None = None
        # the response being relayed
        self.response: httptools.HttpResponseParser | None = None
        self._status_reason = b""
        self._response_headers: Headers = []
        self._response_in_head = True
        self._response_head_bytes = 0
        self._got_response_bytes = False
        self._response_read = 0
        self._interim = False
        self._framing = _NO_BODY
        self._upstream_until_close = False
        self._response_trailers: Headers = []
        self._response_trailer_bytes = 0
        self._body_started = False
        try:
            self._check(url, headers, version)
        except ProxyError as exc:
            self.error = exc
            if isinstance(exc, BadRequest):
                self.close_client = True  # what follows a malformed head is not trusted

    # --- request side ---

    def _check(self, url: bytes, headers: Headers, version: str) -> None:
        client = self.client
        if client.denied is not None:
            raise PeerDenied(reason=client.denied)
        if version != "1.1" and version != "1.0":
            raise BadRequest("Only HTTP/1.0 and HTTP/1.1 are served on this socket.")
        try:
            lines, host, framing, upgrade = request_fields(headers)
            self.origin, self.path = parse_target(url, host, self.method)
        except BadRequest:
            self.origin, self.path = _named_target(url, headers, self.method)
            raise
        self.headers = lines
        self.body_framing = framing
        # a body-less request is whole once its head is: an early answer keeps the connection
        self.request_done = framing is None or framing == b"0"
        if upgrade is not None and client.parser.should_upgrade():
            self.upgrade = upgrade

    def start(self) -> None:
        """Route and get an upstream connection (from the pool when one is idle)."""
        if self.error is not None:
            self.fail(self.error)
            return
        origin = self.origin
        assert origin is not None
        if self.done or self.client.closed:
            return
        try:
            loaded = self.server.keychain.route(origin.host, origin.port, self.client.caller)
        except ProxyError as exc:
            self.fail(exc)
            return
        except Exception:  # fail closed, and loudly: never leave a request unanswered
            log.exception("routing %s failed", origin.where)
            self.fail(ProxyError("The agent could not handle this request."))
            return
        self.loaded = loaded
        conn = self.server.pool.take((loaded, origin.host, origin.port))
        if conn is not None:
            self._attach(conn)
        else:
            self._connect()

    def _connect(self) -> None:
        self.client.pause(_CONNECTING)
        self._connect_task = self.client.loop.create_task(self._connecting())

    async def _connecting(self) -> None:
        assert self.loaded is not None and self.origin is not None
        try:
            conn = await self.server.pool.connect(self.loaded, self.origin)
        except ProxyError as exc:
            self.fail(exc)
            return
        finally:
            self._connect_task = None
            self.client.resume(_CONNECTING)
        if self.loaded.retired and self.server.keychain.locked:
            conn.close()  # locked while connecting: the context may not be used any more
            self.fail(Locked())
        elif self.done or self.client.closed:
            self.server.pool.put(conn)
        else:
            self._attach(conn)

    def _attach(self, conn: UpstreamConnection) -> None:
        assert self.origin is not None and self.path is not None
        self.upstream = conn
        self._reused = conn.reused
        conn.user = self
        self.response = httptools.HttpResponseParser(self)
        transport = conn.transport
        assert transport is not None
        transport.write(
            request_head(
                self.method,
                self.path,
                self.origin.authority,
                self.headers,
                self.body_framing,
                self.upgrade,
            )
        )
        if self.pending:
            transport.writelines(self.pending)
            self.pending = []
            self._body_started = True
        if self.request_done or not self._body_started:
            self.timer.set(self.limits.response_timeout)
        else:
            self.timer.set(self.limits.body_idle_timeout)
        if self.client._writing_paused:
            transport.pause_reading()

    def request_body(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.done:
            return  # already answered (an error): the rest of the body is dropped
        parts = chunk(data) if self.body_framing == b"chunked" else (data,)
        if self.upstream is None:
            self.pending.extend(parts)
        else:
            self.upstream.transport.writelines(parts)  # type: ignore[union-attr]
            if not self.head_sent:
                self._body_started = True
                self.timer.set(self.limits.body_idle_timeout)

    def request_complete(self) -> None:
        had_body = not self.request_done
        self.request_done = True
        if self.done:
            return
        if had_body and self.upstream is not None and not self.head_sent:
            self.timer.set(self.limits.response_timeout)
        if self.body_framing != b"chunked":
            return
        end = last_chunk(self.trailers)
        if self.upstream is None:
            self.pending.append(end)
        else:
            self.upstream.transport.write(end)  # type: ignore[union-attr]

    # --- upstream connection events ---

    def upstream_data(self, data: bytes) -> None:
        """Relay what one upstream read holds; the client gets it in one write."""
        self._got_response_bytes = True
        client = self.client
        if client.tunnel is not None:
            client.write(data)
            return
        self._response_read = len(data)
        client.cork()
        try:
            self.response.feed_data(data)  # type: ignore[union-attr]
        except httptools.HttpParserUpgrade as upgrade:
            if self.upgrade is None:
                self._bad_response("The upstream switched protocols without being asked to.")
            else:
                self._switch_protocols(data[upgrade.args[0] :])
            return
        except httptools.HttpParserError:
            self._bad_response("The upstream answered something that is not valid HTTP/1.1.")
            return
        finally:
            client.uncork()
        if self.done:
            return
        if self.head_sent:  # the answer's idle time runs from its last read
            self.timer.set(self.limits.body_idle_timeout)
        elif self._response_in_head:
            # as for requests: a head that began in this read counts its parsed
            # fields, each later read belongs to it whole
            if self._response_head_bytes < 0:
                self._response_head_bytes = _fields_size(self._response_headers)
            else:
                self._response_head_bytes += len(data)
            if self._response_head_bytes > self.limits.upstream_head_bytes:
                self._response_head_too_large()

    def _response_head_too_large(self) -> None:
        self._bad_response(
            f"The upstream's response head exceeds {self.limits.upstream_head_bytes} bytes."
        )

    def upstream_lost(self, exc: Exception | None) -> None:
        self.upstream = None
        if self.done:
            return
        if self.client.tunnel is not None:
            self._audit(None)
            self.done = True
            self.client.close()
        elif not self.head_sent:
            if self._may_retry():
                self._connect()  # a pooled connection the upstream had just closed
            else:
                where = self.origin.where  # type: ignore[union-attr]
                self.fail(UpstreamUnreachable(f"{where} closed the connection without answering."))
        elif self._upstream_until_close and exc is None:
            self._complete()
        else:  # cut short upstream: cut short to the client too
            self._audit(UpstreamCut())
            self.done = True
            self.timer.cancel()
            self.client.abort()

    def upstream_paused(self, paused: bool) -> None:
        if paused:
            self.client.pause(_UPSTREAM_FULL)
        else:
            self.client.resume(_UPSTREAM_FULL)

    # --- llhttp callbacks (response) ---

    def on_message_begin(self) -> None:
        if self.done and self._pooled is not None:
            # a second answer to one request: that connection is out of step
            self._pooled.close()
            self._pooled = None
        self._status_reason = b""
        self._response_headers = []
        self._response_in_head = True
        self._response_head_bytes = -1  # counted after this read (see upstream_data)

    def on_status(self, reason: bytes) -> None:
        self._status_reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response_in_head:
            self._response_headers.append((name, value))
            return
        self._response_trailers.append((name, value))
        self._response_trailer_bytes += len(name) + len(value) + 4
        if self._response_trailer_bytes > self.limits.upstream_head_bytes:
            self._bad_response(
                f"The upstream's trailer fields exceed {self.limits.upstream_head_bytes} bytes."
            )

    def on_headers_complete(self) -> None:
        self._response_in_head = False
        if self.done:
            return
        limit = self.limits.upstream_head_bytes
        headers = self._response_headers
        reason = self._status_reason
        # as for requests: added up only when the head could exceed the limit
        could_exceed = self._response_head_bytes >= 0 or self._response_read + len(headers) > limit
        if could_exceed and len(reason) + _fields_size(headers) > limit:
            self._response_head_too_large()
            return
        status = self.response.get_status_code()  # type: ignore[union-attr]
        if status == 101:
            if self.upgrade is None:
                self._bad_response("The upstream switched protocols without being asked to.")
            else:  # llhttp ends this message, then hands back the rest: the switch comes then
                self._interim = True
            return
        if 100 <= status < 200:
            self._interim = True
            if status == 100 and not self.request_done:
                # the upstream asked for the body: a wait from now on is the client's
                self._body_started = True
                self.timer.set(self.limits.body_idle_timeout)
            if not self.version_10:
                head = status_line(status, self._status_reason)
                self.client.write(encode_head(head, field_lines(self._response_headers)))
            return
        self._send_response_head(status)
        if self._framing == _NO_BODY and self.method == b"HEAD" and not self.done:
            self._complete()  # llhttp would wait for a body that a HEAD answer never has

    def on_body(self, body: bytes) -> None:
        if self.done:
            return
        self.bytes_out += len(body)
        client = self.client
        if self._framing == _CHUNKED:
            client.writelines(chunk(body))
        elif client._corked is not None and not client.closed:
            client._corked.append(body)  # the usual way: within upstream_data
        else:
            client.write(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
        elif not self.done:
            self._complete()

    # --- answering ---

    def _send_response_head(self, status: int) -> None:
        self.status = status
        if self.upgrade is not None:
            self.close_client = True  # a refused upgrade: the client's parser is past it
        lines, length, coding = response_fields(self._response_headers)
        chunked = coding is not None
        if self.method == b"HEAD" or status in (204, 304):
            self._framing = _NO_BODY
            if length is not None:
                lines.append(b"Content-Length: " + length)
        elif coding is not None and coding != b"chunked":
            # the agent sends no TE field, so chunked is the only coding an
            # upstream may use; "gzip, chunked" relayed as plain chunks would
            # hand the client gzip bytes as the body
            self.fail(
                UpstreamBadResponse(
                    "The upstream used a transfer coding other than chunked,"
                    " which the agent never offers."
                )
            )
            return
        elif length is not None and not chunked:
            self._framing = _LENGTH
            lines.append(b"Content-Length: " + length)
        else:
            # chunked, or delimited by the upstream closing: HTTP/1.1 clients
            # get chunks (trailers kept), HTTP/1.0 clients read until close
            self._upstream_until_close = not chunked
            if self.version_10:
                self._framing = _UNTIL_CLOSE
                self.close_client = True
            else:
                self._framing = _CHUNKED
                lines.append(b"Transfer-Encoding: chunked")
        if not self.request_done:
            self.close_client = True  # the upstream answered before the body was all sent
        if self.close_client:
            lines.append(b"Connection: close")
        self.client.write(encode_head(status_line(status, self._status_reason), lines))
        self.head_sent = True  # upstream_data sets the body's idle time

    def _complete(self) -> None:
        """The answer is whole: end it, and pool the upstream if it can go on."""
        self.done = True
        self.timer.cancel()
        if self._framing == _CHUNKED:
            self.client.write(last_chunk(self._response_trailers))
        reusable = (
            self.request_done
            and not self._upstream_until_close
            and self.response.should_keep_alive()  # type: ignore[union-attr]
        )
        self._pooled = self._release(self.server.pool if reusable else None)
        self._audit(None)
        self.response = None  # the parser refers back here: let refcounting free both
        self.client.exchange_done(self, self.close_client)

    def fail(self, error: ProxyError) -> None:
        """Answer with the agent's own error, or cut the client off mid-answer."""
        if self.done:
            return
        self._audit(error)
        self.done = True
        self.timer.cancel()
        if self._connect_task is not None:
            self._connect_task.cancel()
        self._release(None)
        self.response = None
        if self.head_sent:
            self.client.abort()
            return
        close = self.close_client or not self.request_done
        self.client.write(error_response(error, close=close))
        self.client.exchange_done(self, close)

    def client_gone(self) -> None:
        # a client closing its tunnel is how a tunnel ends; an answer it left was cut off
        self._audit(None if self.client.tunnel is not None else ClientGone())
        self.done = True
        self.timer.cancel()
        if self._connect_task is not None:
            self._connect_task.cancel()
        self._release(None)

    def _release(self, pool: Pool | None) -> UpstreamConnection | None:
        """Let go of the upstream: back to ``pool`` when it is clean, else aborted.

        A connection with request bytes still queued (the upstream answered
        before reading them all) is never reused, and the client's reading,
        paused for that connection's full buffer, is resumed.
        """
        conn, self.upstream = self.upstream, None
        if self.client._paused & _UPSTREAM_FULL:
            self.client.resume(_UPSTREAM_FULL)
        if conn is None:
            return None
        conn.user = None
        transport = conn.transport
        if pool is None or transport is None or transport.get_write_buffer_size():
            conn.abort()
            return None
        if self.client._writing_paused:
            transport.resume_reading()
        pool.put(conn)
        return conn

    def _audit(self, error: ProxyError | None) -> None:
        """One audit line per exchange, however it ends (the first call wins)."""
        audit = self.server.audit
        if audit is None or self._audited:
            return
        self._audited = True
        origin = self.origin
        loaded = self.loaded
        audit.request(
            None if loaded is None else loaded.identity.name,
            self.method,
            None if origin is None else origin.host,
            None if origin is None else origin.port,
            self.path,
            error.status if error is not None and not self.head_sent else self.status,
            self.bytes_in,
            self.bytes_out,
            time.monotonic() - self.started,
            self.client.caller,
            error,
        )

    def _bad_response(self, message: str) -> None:
        self.fail(UpstreamBadResponse(message))

    def _switch_protocols(self, upstream_bytes: bytes) -> None:
        """The upstream accepted the upgrade: relay its 101, then raw bytes."""
        lines = field_lines(self._response_headers)
        lines += (b"Connection: upgrade", b"Upgrade: " + (self.upgrade or b""))
        self.client.write(encode_head(status_line(101, self._status_reason), lines))
        self.status = 101
        self.head_sent = True
        self.timer.cancel()
        if upstream_bytes:
            self.client.write(upstream_bytes)
        self.client.start_tunnel(self.upstream, self.upgrade_bytes)  # type: ignore[arg-type]

    def _may_retry(self) -> bool:
        """Only a body-less request on a reused connection that got no byte back.

        An upstream may close an idle keep-alive connection just as we reuse
        it; such a request never reached it and is safe to send again, once.
        """
        if (
            self._reused
            and self.method in _SAFE_METHODS
            and self.body_framing is None
            and not self._got_response_bytes
        ):
            self._reused = False
            return True
        return False

    def timed_out(self) -> None:
        if self.done:
            return
        if not self.head_sent and self._body_started and not self.request_done:
            # the client stopped sending its body: the upstream is not to blame, and
            # must not take the part it got for a whole request
            self._audit(ClientStalled())
            self.done = True
            if self.upstream is not None:
                self.upstream.abort()
            self.client.close()
        elif not self.head_sent:
            where = self.origin.where  # type: ignore[union-attr]
            self.fail(
                UpstreamTimeout(
                    f"{where} sent no response head within {self.limits.response_timeout:g} s."
                )
            )
        else:  # the body stopped: the client's reading was paused, or the upstream's sending
            stalled = ClientStalled() if self.client._writing_paused else UpstreamTimeout()
            self._audit(stalled)
            self.done = True
            if self.upstream is not None:
                self.upstream.abort()
            self.client.abort()
