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


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=False)


def list_json(
    identities: Iterable[Identity],
    broken: Mapping[str, str],
    loaded: set[str],
    agent_broken: Mapping[str, str],
) -> list[dict[str, Any]]:
    """``list --json``: summaries plus ``loaded``; unreadable ones as name and reason.

    An identity whose metadata reads but which the agent could not load
    (its sealed key did not open) keeps its summary and gains ``broken``.
    """
    rows: list[dict[str, Any]] = []
    for identity in identities:
        row = identity.summary()
        row["loaded"] = identity.name in loaded
        if identity.name in agent_broken:
            row["broken"] = agent_broken[identity.name]
        rows.append(row)
    rows.extend({"name": name, "broken": reason} for name, reason in broken.items())
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
            blocks.append(f"{row['name']} (unreadable)\n  reason:      {row['broken']}")
            continue
        expires = when(identity.not_after) + (" (expired)" if identity.expired() else "")
        lines = [
            identity.name,
            f"  subject:     {identity.subject}",
            f"  issuer:      {identity.issuer}",
            f"  expires:     {expires}",
            f"  hosts:       {hosts_text(identity)}",
            f"  sha256:      {identity.fingerprint}",
            f"  loaded:      {'yes' if row['loaded'] else 'no'}",
        ]
        if "broken" in row:
            lines.append(f"  broken:      {row['broken']}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def status_text(status: Mapping[str, Any]) -> str:
    """``status``: one ``field: value`` line each; broken identities one per line."""
    sockets = status.get("sockets") or {}
    lines = [
        f"state:       {status.get('state', '?')}",
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
    if "pid" in status or "version" in status:
        lines.append(
            f"agent:       pid {status.get('pid', '?')}, version {status.get('version', '?')}"
        )
    return "\n".join(lines)
