"""The audit log: who used which identity for what, and every change of state.

One JSON object per line in platformdirs' log folder
(``$XDG_STATE_HOME/mtls-agent/log/audit.jsonl`` on Linux), mode 0600,
rotated by size. Each forwarded request gets a line (time, identity, method,
host, port, path without its query, status, body bytes each way, duration,
and the caller's pid, uid, gid and executable), and so does each unlock,
failed unlock, lock, import, removal, renewal and rule change. What is never
written: a query string, a header, a body, a passphrase, a token, a key.

The data plane calls ``AuditLog.request`` once per request: it encodes the
line from a template and appends it to a queue. A writer thread appends the
lines to the file in batches, every ``flush_interval`` (0.1 s) or sooner
when many wait; it never fsyncs. A disk that stalls cannot stall the relay: past
``max_pending`` waiting lines, new ones are counted and dropped, and the
count is written as soon as the disk takes lines again.

``agentctl`` writes its own events (import, removal, rule changes) with
``append_event``, one ``O_APPEND`` write each, into the same file; only the
agent rotates it, and the agent reopens the file when it was moved away.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.errors import AuditLogError
from agent.paths import make_private_dirs
from agent.peer import exe_path

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.1
#: Waiting lines that wake the writer before its interval is up.
BATCH_LINES = 1024
#: Waiting lines past which new ones are dropped (and counted) instead.
MAX_PENDING = 100_000
#: Longer paths are cut: an audit line is not where a 64 KiB URL belongs.
MAX_PATH_CHARS = 2048
CLOSE_TIMEOUT = 5.0


def request_path(path: bytes | str | None) -> str | None:
    """The path of a request-target as the audit log keeps it: no query, no fragment.

    Queries carry tokens and personal data often enough that none is kept.
    An absolute-form target keeps only its path.
    """
    if path is None:
        return None
    text = path.decode("utf-8", "replace") if isinstance(path, bytes) else path
    text = text.split("?", 1)[0].split("#", 1)[0]
    if "://" in text:
        rest = text.split("://", 1)[1]
        text = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
    return text[:MAX_PATH_CHARS]


def _timestamp(when: float) -> str:
    return (
        datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def _caller_fields(caller: Any) -> dict[str, Any]:
    if caller is None:
        return {"pid": None, "uid": None, "gid": None, "exe": None}
    exe = getattr(caller, "exe", None)  # a bare Peer (the agent itself) has none
    return {"pid": caller.pid, "uid": caller.uid, "gid": caller.gid, "exe": exe}


def _line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode("ascii") + b"\n"


def encode_event(when: float, kind: str, caller: Any, fields: dict[str, Any]) -> bytes:
    """One line for an event: its time and kind, its fields, then who caused it."""
    return _line({"time": _timestamp(when), "event": kind, **fields, **_caller_fields(caller)})


_REQUEST_LINE = (
    '{"time":"%s.%03dZ","event":"request",%s,"path":%s,"status":%d,"bytes_in":%d,'
    '"bytes_out":%d,"duration_ms":%.3f,%s,"error":%s%s}\n'
)
#: Distinct routes, callers and paths whose encoded fields are kept.
FRAGMENTS_CACHED = 1024
#: Longer paths are encoded each time rather than kept.
CACHED_PATH_BYTES = 256


class _RequestEncoder:
    """Request lines from a template: one is written per forwarded request, so
    the document is not built as a dict and run through json.dumps. Every
    string still goes through json's own (C) escaper; what repeats from one
    request to the next (the route, the caller, the time's seconds) is
    encoded once."""

    def __init__(self) -> None:
        self._second = -1
        self._second_text = ""
        self._routes: dict[tuple[Any, ...], str] = {}
        self._callers: dict[tuple[Any, ...], str] = {}
        self._paths: dict[Any, str] = {}

    def __call__(
        self,
        when: float,
        caller: Any,
        identity: str | None,
        method: bytes | str,
        host: str | None,
        port: int | None,
        path: bytes | str | None,
        status: int,
        bytes_in: int,
        bytes_out: int,
        duration: float,
        error: BaseException | None,
    ) -> bytes:
        key = (identity, method, host, port)
        route = self._routes.get(key)
        if route is None:
            route = _kept(self._routes, key, _route_fields(*key))
        if caller is None:
            who = _NO_CALLER
        else:
            key = (caller.pid, caller.uid, caller.gid, getattr(caller, "exe", None))
            who = self._callers.get(key)
            if who is None:
                who = _kept(self._callers, key, _caller_json(*key))
        second = int(when)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        if error is None:
            code = "null"
            reason = ""
        else:
            code = _escape(getattr(error, "code", type(error).__name__))
            text = getattr(error, "reason", None)
            reason = f',"reason":{_escape(text)}' if text else ""
        return (
            _REQUEST_LINE
            % (
                self._second_text,
                int((when - second) * 1000),
                route,
                self._paths.get(path) or self._path(path),
                status,
                bytes_in,
                bytes_out,
                duration * 1000,
                who,
                code,
                reason,
            )
        ).encode("ascii")

    def _path(self, path: bytes | str | None) -> str:
        """``request_path`` as JSON; kept for the short paths that repeat."""
        text = _json_str(request_path(path))
        if path is not None and len(path) <= CACHED_PATH_BYTES:
            _kept(self._paths, path, text)
        return text


def _kept(cache: dict[Any, str], key: Any, value: str) -> str:
    if len(cache) >= FRAGMENTS_CACHED:
        cache.clear()
    cache[key] = value
    return value


def _route_fields(identity: str | None, method: bytes | str, host: str | None, port: Any) -> str:
    if isinstance(method, bytes):
        method = method.decode("ascii", "replace")
    port_json = "null" if port is None else int(port)
    return (
        f'"identity":{_json_str(identity)},"method":{_json_str(method)},'
        f'"host":{_json_str(host)},"port":{port_json}'
    )


def _caller_json(pid: int | None, uid: int | None, gid: int | None, exe: str | None) -> str:
    return (
        f'"pid":{_json_int(pid)},"uid":{_json_int(uid)},"gid":{_json_int(gid)},'
        f'"exe":{_json_str(exe)}'
    )


def _json_str(value: str | None) -> str:
    return "null" if value is None else _escape(value)


def _json_int(value: int | None) -> str:
    return "null" if value is None else str(int(value))


_escape = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
_NO_CALLER = _caller_json(None, None, None, None)


def identity_fields(identity: Any) -> dict[str, Any]:
    """What an import, enrollment or renewal line says about the identity stored."""
    fields = {
        "identity": identity.name,
        "subject": identity.subject,
        "serial": identity.serial,
        "fingerprint_sha256": identity.fingerprint,
        "hosts": [str(host) for host in identity.hosts],
        "source": identity.source.get("kind"),
    }
    if identity.callers:
        fields["callers"] = identity.callers.to_metadata()
    return fields


def open_log_file(path: Path) -> int:
    """Open ``path`` for appending, creating it (and its folders) private.

    Refuses a symlink and a file it cannot make 0600 (another user's).
    """
    try:
        make_private_dirs(path.parent)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise AuditLogError(f"cannot open the audit log {path}: {exc.strerror or exc}.") from None
    try:
        if os.fstat(fd).st_uid != os.getuid():
            raise AuditLogError(f"the audit log {path} belongs to another user; remove it.")
        os.fchmod(fd, 0o600)
    except OSError as exc:
        os.close(fd)
        raise AuditLogError(f"cannot open the audit log {path}: {exc.strerror or exc}.") from None
    except AuditLogError:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def append_event(path: Path, kind: str, **fields: Any) -> None:
    """Append one event line now, caused by this process (``agentctl``'s way in)."""
    me = {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(), "exe": exe_path(os.getpid())}
    line = _line({"time": _timestamp(time.time()), "event": kind, **fields, **me})
    fd = open_log_file(path)
    try:
        _write_all(fd, line)
    finally:
        os.close(fd)


class AuditLog:
    """The agent's audit log writer (see the module docstring for its contract)."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        keep: int,
        flush_interval: float = FLUSH_INTERVAL,
        batch_lines: int = BATCH_LINES,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.path = Path(path)
        self._max_bytes = max_bytes
        self._keep = keep
        self._interval = flush_interval
        self._batch = batch_lines
        self._max_pending = max_pending
        self._fd = open_log_file(self.path)
        self._size = os.fstat(self._fd).st_size
        self._pending: deque[Any] = deque()
        self._wake = threading.Event()  # lines wait
        self._hurry = threading.Event()  # many lines wait, or closing
        self._closing = False
        self._dropped = 0  # lines refused at the queue; written by the producers only
        self._dropped_seen = 0  # how many of those the writer has accounted for
        self._lost = 0  # lines not yet reported as lost; written by the writer only
        self._failing = False
        self._encode_request = _RequestEncoder()
        self._thread = threading.Thread(target=self._run, name="audit-log", daemon=True)
        self._thread.start()

    # --- producers (the event loop) ---

    def request(
        self,
        identity: str | None,
        method: bytes | str,
        host: str | None,
        port: int | None,
        path: bytes | str | None,
        status: int,
        bytes_in: int,
        bytes_out: int,
        duration: float,
        caller: Any,
        error: BaseException | None = None,
    ) -> None:
        """Log one answered request: encode its line here, queue it for the writer.

        Encoding on the event loop, a line at a time, spreads the work evenly:
        the writer thread would hold the interpreter for a whole batch at a
        time, and stall the relay's answers for as long.

        ``bytes_in`` is the request body received from the caller,
        ``bytes_out`` the response body sent back to it; ``duration`` is in
        seconds; ``error`` is the agent's own error when it answered itself
        (its ``reason``, for a denied caller, names the rule that refused).
        """
        try:
            line = self._encode_request(
                time.time(), caller, identity, method, host, port, path, status,
                bytes_in, bytes_out, duration, error,
            )  # fmt: skip
        except (TypeError, ValueError) as exc:  # a field that is not JSON: a bug, not a crash
            log.error("audit line for a request not written: %s", exc)
            return
        self._put(line)

    def event(self, kind: str, caller: Any = None, **fields: Any) -> None:
        """Log an event (``unlock``, ``lock``, ``renew``...) with JSON-safe fields."""
        self._put((time.time(), kind, caller, fields))

    def _put(self, item: bytes | tuple[Any, ...]) -> None:
        pending = self._pending
        if len(pending) >= self._max_pending or self._closing:
            self._dropped += 1
            return
        pending.append(item)
        if not self._wake.is_set():
            self._wake.set()
        if len(pending) >= self._batch:
            self._hurry.set()

    def flush(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Wait until every line logged so far is written; False on timeout."""
        done = threading.Event()
        self._pending.append(done)
        self._wake.set()
        self._hurry.set()
        return done.wait(timeout)

    def close(self) -> None:
        """Write what waits, stop the writer, close the file."""
        if self._closing:
            return
        self.flush()
        self._closing = True
        self._wake.set()
        self._hurry.set()
        self._thread.join(CLOSE_TIMEOUT)
        if not self._thread.is_alive():
            os.close(self._fd)

    # --- the writer thread ---

    def _run(self) -> None:
        while not self._closing:
            self._wake.wait()
            self._wake.clear()
            if self._hurry.wait(self._interval):
                self._hurry.clear()
            self._drain()
        self._drain()

    def _drain(self) -> None:
        items = []
        pending = self._pending
        while pending:
            items.append(pending.popleft())
        lines = []
        flushed = []
        for item in items:
            if isinstance(item, bytes):  # a request's line, encoded by ``request``
                lines.append(item)
                continue
            if isinstance(item, threading.Event):
                flushed.append(item)
                continue
            when, kind, caller, fields = item
            try:
                lines.append(encode_event(when, kind, caller, fields))
            except (TypeError, ValueError) as exc:  # a field that is not JSON: a bug, not a crash
                log.error("audit line for %s not written: %s", kind, exc)
        dropped, self._dropped_seen = self._dropped - self._dropped_seen, self._dropped
        self._lost += dropped
        if self._lost:
            lines.append(encode_event(time.time(), "audit-dropped", None, {"lines": self._lost}))
        if lines:
            self._write(lines, len(lines) - (1 if self._lost else 0))
        for done in flushed:
            done.set()

    def _write(self, lines: list[bytes], count: int) -> None:
        """Append the lines, ``count`` of them requests and events (the rest a
        report of lost ones); on failure, count those not written as lost."""
        written = 0
        try:
            self._follow_moves()
            while written < len(lines):
                part = self._fitting(lines, written)
                if not part:
                    self._rotate()
                    continue
                data = b"".join(lines[written : written + part])
                _write_all(self._fd, data)
                self._size += len(data)
                written += part
        except (OSError, AuditLogError) as exc:
            if not self._failing:
                log.warning("cannot write the audit log %s: %s", self.path, exc)
                self._failing = True
            self._lost += max(count - written, 0)
            return
        self._lost = 0
        self._failing = False

    def _fitting(self, lines: list[bytes], start: int) -> int:
        """How many lines from ``start`` fit in the file before ``max_bytes``;
        0 means rotate first. A line bigger than the limit goes alone into a
        file of its own."""
        room = self._max_bytes - self._size
        if sum(map(len, lines[start:])) <= room:  # the usual case: the whole batch
            return len(lines) - start
        end = start
        for line in lines[start:]:
            room -= len(line)
            if room < 0:
                break
            end += 1
        if end == start and not self._size:
            return 1
        return end - start

    def _follow_moves(self) -> None:
        """Reopen when the file was removed or renamed (logrotate, a user)."""
        mine = os.fstat(self._fd)
        try:
            there = os.stat(self.path)
        except FileNotFoundError:
            there = None
        if there is None or (there.st_dev, there.st_ino) != (mine.st_dev, mine.st_ino):
            self._reopen()

    def _rotate(self) -> None:
        """audit.jsonl → .1 → .2 …; the oldest beyond ``keep`` is dropped."""
        for n in range(self._keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._reopen()

    def _reopen(self) -> None:
        fd = open_log_file(self.path)
        os.close(self._fd)
        self._fd = fd
        self._size = os.fstat(fd).st_size
