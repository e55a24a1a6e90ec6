"""config.toml: every setting, its default, and its validation.

The agent must never start half-configured, so the whole file is checked at
load time and the first bad setting is reported with its key and line. The
schema below is the single list of settings; README.md documents the same
names and defaults.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as ``"90s"``, ``"15m"``, ``"8h"``.

    ``0`` (or ``"never"``/``"off"``) means "disabled" where a setting allows it.
    """
    if isinstance(value, bool):
        raise ValueError("a duration such as 30, \"90s\", \"15m\" or \"8h\"")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration that is not negative")
        return float(value)
    if isinstance(value, str):
        if value.strip().lower() in ("never", "off"):
            return 0.0
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    raise ValueError("a duration such as 30, \"90s\", \"15m\" or \"8h\"")


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("a duration greater than zero")
    return seconds


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("a whole number greater than zero")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def _uid_list(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ValueError("a list of numeric user ids, such as [1001, 1002]")
    return tuple(value)


def _setting(parse: Callable[[object], Any], default: Any, key: str) -> Any:
    return field(default=default, metadata={"parse": parse, "key": key})


@dataclass(frozen=True)
class Limits:
    """Bounds on what clients and upstreams may cost the agent (DESIGN.md)."""

    request_line: int = _setting(_positive_int, 8 * 1024, "limits.request_line")
    header_bytes: int = _setting(_positive_int, 64 * 1024, "limits.header_bytes")
    header_fields: int = _setting(_positive_int, 100, "limits.header_fields")
    head_timeout: float = _setting(_positive_duration, 10.0, "limits.head_timeout")
    keepalive_idle: float = _setting(_positive_duration, 75.0, "limits.keepalive_idle")
    connect_timeout: float = _setting(_positive_duration, 10.0, "limits.connect_timeout")
    response_timeout: float = _setting(_positive_duration, 60.0, "limits.response_timeout")
    body_idle_timeout: float = _setting(_positive_duration, 60.0, "limits.body_idle_timeout")
    upstream_head_bytes: int = _setting(_positive_int, 64 * 1024, "limits.upstream_head_bytes")
    pool_idle_timeout: float = _setting(_positive_duration, 30.0, "limits.pool_idle_timeout")
    pool_max_idle: int = _setting(_positive_int, 64, "limits.pool_max_idle")
    listen_backlog: int = _setting(_positive_int, 1024, "limits.listen_backlog")
    control_body_bytes: int = _setting(_positive_int, 64 * 1024, "limits.control_body_bytes")
    # a failed unlock is answered after this delay, doubled per failure in a row, up to the max
    failed_unlock_delay: float = _setting(_positive_duration, 0.1, "limits.failed_unlock_delay")
    failed_unlock_delay_max: float = _setting(
        _positive_duration, 10.0, "limits.failed_unlock_delay_max"
    )
    # a vault writer (agentctl, a renewal) waits this long for another, then fails "vault busy"
    vault_lock_timeout: float = _setting(_positive_duration, 10.0, "limits.vault_lock_timeout")


@dataclass(frozen=True)
class Config:
    """The agent's settings; every field has a default so no file is needed."""

    lock_after_idle: float = _setting(parse_duration, 0.0, "lock_after_idle")
    max_unlocked: float = _setting(parse_duration, 0.0, "max_unlocked")
    lock_on_suspend: bool = _setting(_boolean, True, "lock_on_suspend")
    lock_on_session_lock: bool = _setting(_boolean, True, "lock_on_session_lock")
    renewal_check_interval: float = _setting(_positive_duration, 60.0, "renewal_check_interval")
    renewal_retry_initial: float = _setting(_positive_duration, 60.0, "renewal_retry_initial")
    renewal_retry_max: float = _setting(_positive_duration, 3600.0, "renewal_retry_max")
    proxy_allow_uids: tuple[int, ...] = _setting(_uid_list, (), "proxy.allow_uids")
    audit_max_bytes: int = _setting(_positive_int, 10 * 1024 * 1024, "audit.max_bytes")
    audit_keep: int = _setting(_positive_int, 5, "audit.keep")
    limits: Limits = field(default_factory=Limits)


def _line_of(text: str, dotted_key: str) -> int | None:
    """The line where a key is set, for error messages (tomllib keeps none)."""
    *tables, leaf = dotted_key.split(".")
    table = ".".join(tables)
    current = ""
    pattern = re.compile(rf"^\s*{re.escape(leaf)}\s*=")
    for number, line in enumerate(text.splitlines(), start=1):
        header = re.match(r"^\s*\[\s*([^\]]+?)\s*\]", line)
        if header:
            current = header.group(1)
        elif current == table and pattern.match(line):
            return number
    return None


def _build(cls: type, raw: dict[str, Any], text: str, where: str) -> Any:
    values: dict[str, Any] = {}
    for f in fields(cls):
        if "key" not in f.metadata:  # a nested table, e.g. limits
            continue
        table, _, leaf = f.metadata["key"].rpartition(".")
        section = raw.get(table, {}) if table else raw
        if leaf not in section:
            continue
        try:
            values[f.name] = f.metadata["parse"](section[leaf])
        except ValueError as exc:
            line = _line_of(text, f.metadata["key"])
            at = f"{where}, line {line}" if line else where
            raise ConfigError(
                f"{at}: '{f.metadata['key']}' must be {exc}, not {section[leaf]!r}."
            ) from None
    return cls(**values)


_KNOWN_KEYS = {
    "": {k for f in fields(Config) if "." not in (k := f.metadata.get("key", "."))},
    "proxy": {"allow_uids"},
    "audit": {"max_bytes", "keep"},
    "limits": {f.metadata["key"].split(".", 1)[1] for f in fields(Limits)},
}


def _check_unknown(raw: dict[str, Any], text: str, where: str) -> None:
    """Refuse unknown keys: a typo must not silently fall back to a default."""
    for key, value in raw.items():
        if isinstance(value, dict):
            known = _KNOWN_KEYS.get(key)
            if known is None:
                raise ConfigError(f"{where}: unknown table [{key}].")
            for sub in value:
                if sub not in known:
                    line = _line_of(text, f"{key}.{sub}")
                    at = f"{where}, line {line}" if line else where
                    raise ConfigError(f"{at}: unknown setting '{key}.{sub}'.")
        elif key not in _KNOWN_KEYS[""]:
            line = _line_of(text, key)
            at = f"{where}, line {line}" if line else where
            raise ConfigError(f"{at}: unknown setting '{key}'.")


def parse_config(text: str, where: str = "config.toml") -> Config:
    """A Config from TOML text; ConfigError names the key and the line."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: {exc}.") from None
    _check_unknown(raw, text, where)
    base = _build(Config, raw, text, where)
    limits = _build(Limits, raw, text, where)
    return Config(**{**{f.name: getattr(base, f.name) for f in fields(Config)}, "limits": limits})


def load_config(path: Path, *, required: bool = False) -> Config:
    """The config at ``path``, or the defaults when there is no such file.

    A file named on the command line is ``required``: a typo in its path
    would otherwise start the agent with none of its settings (no idle
    lock, say) and no word of it.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: no such file (named with --config).") from None
        return Config()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}.") from None
    return parse_config(text, str(path))
