"""How agentctl's answers look: human text and JSON, nothing else.

Kept apart from the commands so that the wording of every line a user (or
a script) reads is in one place.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.identity import Identity


def sentence(text: str) -> str:
    """``text`` as agentctl's one-line messages read: lower-case start, a full stop.

    The first letter is lowered only when the second is lower case too, so
    "PKCS#12" and "TLS" keep their spelling.
    """
    text = " ".join(text.split())
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        text = text[0].lower() + text[1:]
    if text and text[-1] not in ".!?":
        text += "."
    return text


def when(moment: datetime) -> str:
    """A certificate time as people read it, always in UTC."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(seconds: float) -> str:
    """``93784`` → ``1d 2h 03m 04s``; short durations stay short."""
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m {secs:02d}s"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def hosts_text(identity: Identity) -> str:
    return ", ".join(str(h) for h in identity.hosts)


def imported_line(identity: Identity) -> str:
    return (
        f"imported {identity.name}: {identity.subject}, expires {when(identity.not_after)}, "
        f"hosts {hosts_text(identity)}"
    )


def enrolled_line(identity: Identity, renewal_due: float) -> str:
    """What ``enroll --est`` prints: like ``import``, plus when renewal is due."""
    due = datetime.fromtimestamp(renewal_due, UTC)
    return (
        f"enrolled {identity.name}: {identity.subject}, expires {when(identity.not_after)}, "
        f"hosts {hosts_text(identity)}; the agent renews it from about {when(due)}"
    )


def renewed_line(summary: Mapping[str, Any]) -> str:
    """What ``renew`` prints, from the renewed identity's summary."""
    not_after = datetime.fromisoformat(str(summary.get("not_after")))
    return (
        f"renewed {summary.get('name')}: serial {summary.get('serial')}, "
        f"valid until {when(not_after)}"
    )


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=False)


def list_json(
    identities: Iterable[Identity],
    broken: Mapping[str, str],
    loaded: set[str],
    agent_broken: Mapping[str, str],
    next_renewal: Mapping[str, str] | None = None,
    pending: set[str] | frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """``list --json``: summaries plus ``loaded``; unreadable ones as name and
    reason, with ``pending`` set for an EST enrollment not yet finished.

    An identity whose metadata reads but which the agent could not load
    (its sealed key did not open) keeps its summary and gains ``broken``.
    ``next_renewal`` (ISO time) is set for the identities the agent renews,
    ``null`` for the others; ``source_url`` names where it was enrolled.
    """
    rows: list[dict[str, Any]] = []
    for identity in identities:
        row = identity.summary()
        row["source_url"] = identity.source.get("url")
        row["next_renewal"] = (next_renewal or {}).get(identity.name)
        row["loaded"] = identity.name in loaded
        if identity.name in agent_broken:
            row["broken"] = agent_broken[identity.name]
        rows.append(row)
    for name, reason in broken.items():
        unread: dict[str, Any] = {"name": name, "broken": reason}
        if name in pending:
            unread["pending"] = True
        rows.append(unread)
    rows.sort(key=lambda row: row["name"])
    return rows


def list_text(rows: list[dict[str, Any]], identities: Mapping[str, Identity]) -> str:
    """``list``: one block per identity, blank lines between them."""
    if not rows:
        return "no identities; add one with 'agentctl import NAME FILE.p12 --host PATTERN'"
    blocks = []
    for row in rows:
        identity = identities.get(row["name"])
        if identity is None:
            label = "enrollment pending" if row.get("pending") else "unreadable"
            blocks.append(f"{row['name']} ({label})\n  reason:      {row['broken']}")
            continue
        expires = when(identity.not_after) + (" (expired)" if identity.expired() else "")
        source = " ".join(filter(None, (row["source"], row.get("source_url"))))
        renews = row.get("next_renewal")
        renews = when(datetime.fromisoformat(renews)) if renews else "no (not from EST)"
        lines = [
            identity.name,
            f"  subject:     {identity.subject}",
            f"  issuer:      {identity.issuer}",
            f"  expires:     {expires}",
            f"  hosts:       {hosts_text(identity)}",
            f"  sha256:      {identity.fingerprint}",
            f"  source:      {source}",
            f"  renews:      {renews}",
            f"  loaded:      {'yes' if row['loaded'] else 'no'}",
        ]
        if identity.callers:
            lines.append(f"  callers:     {'; '.join(caller_rule_lines(identity))}")
        if "broken" in row:
            lines.append(f"  broken:      {row['broken']}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def status_text(status: Mapping[str, Any]) -> str:
    """``status``: one ``field: value`` line each; broken identities one per line."""
    sockets = status.get("sockets") or {}
    autolock = status.get("autolock") or {}
    state = str(status.get("state", "?"))
    if state == "locked" and autolock.get("last_lock") in _LOCK_REASONS:
        state += f" ({_LOCK_REASONS[autolock['last_lock']]})"
    lines = [
        f"state:       {state}",
        f"identities:  {status.get('loaded', 0)} loaded of {status.get('identities', 0)}",
        f"uptime:      {duration(float(status.get('uptime_seconds', 0)))}",
        f"requests:    {status.get('requests_served', 0)} served",
        f"proxy:       {sockets.get('proxy', '?')}",
        f"control:     {sockets.get('control', '?')}",
    ]
    broken = status.get("broken") or {}
    if broken:
        lines.append("broken:")
        lines.extend(f"  {name}: {reason}" for name, reason in sorted(broken.items()))
    else:
        lines.append("broken:      none")
    renewal = status.get("renewal") or {}
    if renewal:
        lines.append("renewal:")
        lines.extend(f"  {name}: {renewal_text(r)}" for name, r in sorted(renewal.items()))
    if autolock:
        lines.append(f"autolock:    {autolock_text(autolock)}")
        if autolock.get("locks_in") is not None:
            lines.append(f"locks in:    {duration(float(autolock['locks_in']))}")
    if "pid" in status or "version" in status:
        manager = status.get("service_manager")
        lines.append(
            f"agent:       pid {status.get('pid', '?')}, version {status.get('version', '?')}"
            + (f", started by {manager}" if manager else "")
        )
    return "\n".join(lines)


#: Why the agent locked (``autolock.last_lock`` in ``status --json``), as ``status`` says it.
_LOCK_REASONS = {
    "idle": "no request for lock_after_idle",
    "max-unlocked": "unlocked for its time limit",
    "suspend": "the system went to sleep",
    "session-lock": "the session was locked",
    "request": "agentctl lock",
}


def autolock_text(autolock: Mapping[str, Any]) -> str:
    """When the agent locks itself, from ``status``'s ``autolock`` object."""
    when_ = []
    if autolock.get("lock_after_idle"):
        when_.append(f"after {duration(float(autolock['lock_after_idle']))} idle")
    if autolock.get("max_unlocked"):
        when_.append(f"{duration(float(autolock['max_unlocked']))} after unlock")
    if autolock.get("lock_on_suspend"):
        when_.append("on suspend")
    if autolock.get("lock_on_session_lock"):
        when_.append("on session lock")
    return ", ".join(when_) or "never (only agentctl lock)"


def renewal_text(report: Mapping[str, Any]) -> str:
    """One identity's renewal as ``status`` shows it."""
    nxt = report.get("next_renewal")
    at = when(datetime.fromisoformat(nxt)) if isinstance(nxt, str) else "?"
    state = report.get("state")
    if state == "renewing":
        return "renewing now"
    if state == "waiting-for-unlock":
        return f"due since {at}, waiting for unlock"
    if state == "failing":
        return (
            f"failing ({report.get('failures')} in a row): {report.get('last_error')}; "
            f"next try {at}"
        )
    return f"next {at}"


# --- caller rules and the audit log ---------------------------------------------------


def caller_rule_lines(identity: Identity) -> list[str]:
    """``allow-uid 1000, 1001``: one per kind of rule the identity has."""
    rules = identity.callers
    kinds = (
        ("allow-uid", rules.uids),
        ("allow-gid", rules.gids),
        ("allow-exe", rules.exes),
        ("allow-exe-sha256", rules.exe_sha256),
    )
    return [f"{kind} {', '.join(map(str, values))}" for kind, values in kinds if values]


def policy_text(identity: Identity) -> str:
    """``policy NAME``: the rules, or that there are none."""
    if not identity.callers:
        return f"{identity.name}: no caller rules; any process the proxy socket lets in may use it"
    lines = [f"{identity.name}: only a caller that matches every kind of rule below may use it"]
    lines += [f"  {line}" for line in caller_rule_lines(identity)]
    return "\n".join(lines)


def _size(count: Any) -> str:
    if not isinstance(count, int):
        return "?"
    if count < 1024:
        return f"{count} B"
    if count < 1024 * 1024:
        return f"{count / 1024:.1f} KiB"
    return f"{count / (1024 * 1024):.1f} MiB"


def _who(entry: Mapping[str, Any]) -> str:
    if entry.get("pid") is None:
        return ""
    exe = entry.get("exe") or "?"
    return f"  pid {entry.get('pid')} uid {entry.get('uid')} {exe}"


def audit_text(entry: Mapping[str, Any]) -> str:
    """One audit-log entry as ``agentctl log`` prints it (``--json`` prints the line itself)."""
    try:
        stamp = when(datetime.fromisoformat(str(entry.get("time")).replace("Z", "+00:00")))
    except ValueError:
        stamp = str(entry.get("time"))
    kind = entry.get("event")
    if kind == "request":
        host, port = entry.get("host"), entry.get("port")
        # a head refused before its target was known has no host (and maybe no method)
        where = f"[{host}]" if isinstance(host, str) and ":" in host else str(host or "")
        if host and port not in (None, 443):
            where += f":{port}"
        target = f"{where}{entry.get('path') or ''}" or "-"
        outcome = str(entry.get("status"))
        if entry.get("error"):
            outcome += f" {entry['error']}"
        if entry.get("reason"):
            outcome += f" ({entry['reason']})"
        return (
            f"{stamp}  request  {entry.get('identity') or '-'}  {entry.get('method') or '-'} "
            f"{target} -> {outcome}  in {_size(entry.get('bytes_in'))}, "
            f"out {_size(entry.get('bytes_out'))}, {entry.get('duration_ms')} ms{_who(entry)}"
        )
    common = {"time", "event", "pid", "uid", "gid", "exe"}
    details = " ".join(
        f"{key}={_value(value)}"
        for key, value in entry.items()
        if key not in common and value not in (None, [], {})
    )
    return f"{stamp}  {kind}  {details}{_who(entry)}".rstrip()


_RULE_KINDS = {"uids": "uid", "gids": "gid", "exes": "exe", "exe_sha256": "exe-sha256"}


def _value(value: Any) -> str:
    """A field of an event, short: lists comma-joined, caller rules as flags."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict) and set(value) <= set(_RULE_KINDS):
        rules = [f"allow-{_RULE_KINDS[k]}:{_value(v)}" for k, v in value.items() if v]
        return "+".join(rules) or "none"
    return str(value)
