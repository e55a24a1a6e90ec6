"""What each agentctl command does: gather input, call the agent, print.

No crypto and no storage here. What must work without a running agent
(creating a vault, importing, listing, removing) calls ``agent.vault``,
``agent.enroll`` and ``agent.keychain`` directly; the rest goes over the
control socket. Heavier agent modules are imported inside the commands that
need them, so ``agentctl status`` does not pay for loading cryptography.
Every command returns its exit code; errors are raised as ``AgentError``
and printed by ``cli.main``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import AgentError, AgentNotRunning, BadPassphrase, IdentityError, KeyringError
from agent.paths import SOCK_ENV, client_sockets, default_paths
from cli import prompt, render
from cli.control_client import UNLOCK_TIMEOUT, ControlClient, ControlError

if TYPE_CHECKING:
    from agent.identity import Identity
    from agent.vault import Vault


def _vault() -> Vault:
    """The vault, waiting for another writer as long as config.toml says."""
    from agent.config import load_config
    from agent.vault import Vault

    paths = default_paths()
    limits = load_config(paths.config_file).limits
    return Vault(paths.vault_dir, lock_timeout=limits.vault_lock_timeout)


def _control() -> ControlClient:
    return ControlClient(client_sockets()[1])


def _say(line: str) -> None:
    print(line, flush=True)


def _warn(line: str) -> None:
    print(f"agentctl: {render.sentence(line)}", file=sys.stderr, flush=True)


def _reload_agent() -> None:
    """Have a running agent re-read the vault; no agent is fine (it reads at start)."""
    try:
        _control().post("/v1/reload")
    except AgentNotRunning:
        return
    except AgentError as exc:
        _warn(f"the vault changed, but the running agent did not reload it: {exc.message}")


def _audit(kind: str, **fields: object) -> None:
    """Append an event (import, removal, rule change) to the audit log; warn on failure."""
    from agent.audit import append_event

    try:
        append_event(default_paths().audit_log, kind, **fields)
    except AgentError as exc:
        _warn(f"the audit log was not written: {exc.message}")


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise AgentError(f"cannot read {what} {path}: {reason}.") from None


# --- commands ---------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    vault = _vault()
    if vault.exists():
        raise AgentError(f"a vault already exists in {vault.directory}; it was left untouched.")
    if args.passphrase_file is not None:
        passphrase = prompt.read_passphrase_file(args.passphrase_file)
    else:
        passphrase = prompt.ask_new_passphrase("--passphrase-file")
    vault.create(passphrase)
    _say(f"created a vault in {vault.directory}")
    _say("next: agentctl import NAME FILE.p12 --host PATTERN")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from agent.audit import identity_fields
    from agent.enroll import import_pkcs12
    from agent.vault import check_name
    from cli.policy import caller_rules_from

    check_name(args.name)
    vault = _vault()
    if not vault.exists():
        raise AgentError("there is no vault yet; create one with 'agentctl init'.")
    if not args.replace and args.name in vault.names():
        raise AgentError(
            f"an identity named '{args.name}' already exists; use --replace to overwrite it."
        )
    callers = caller_rules_from(args)
    data = _read_file(args.file, "the PKCS#12 file")
    ca_pem = None if args.ca is None else _read_file(args.ca, "the CA bundle")
    password = prompt.p12_password(args.p12_password_file, args.file)
    try:
        identity = import_pkcs12(
            vault,
            args.name,
            data,
            password,
            args.host,
            ca_pem=ca_pem,
            pins=args.pin,
            min_tls=args.min_tls,
            source={"kind": "pkcs12-file"},
            replace=args.replace,
            callers=callers,
        )
    except IdentityError as exc:
        raise IdentityError(f"cannot import {args.file}: {render.sentence(exc.message)}") from None
    _audit("import", **identity_fields(identity))
    _say(render.imported_line(identity))
    if identity.expired():
        _warn(f"note: the certificate of '{identity.name}' has already expired")
    _reload_agent()
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from agent.keychain import read_identities

    vault = _vault()
    if not vault.exists():
        raise AgentError(
            f"there is no vault in {vault.directory}; create one with 'agentctl init'."
        )
    identities, broken = read_identities(vault)
    loaded: set[str] = set()
    agent_broken: dict[str, str] = {}
    renewal: dict[str, object] = {}
    try:
        answer = _control().get("/v1/identities")
    except AgentNotRunning:
        pass
    except AgentError as exc:
        _warn(f"cannot ask the running agent what is loaded: {exc.message}")
    else:
        loaded = {n for n in answer.get("loaded", []) if isinstance(n, str)}
        reported = answer.get("broken")
        if isinstance(reported, dict):
            agent_broken = {n: str(r) for n, r in reported.items() if n in identities}
        if isinstance(answer.get("renewal"), dict):
            renewal = answer["renewal"]
    next_renewal = _next_renewals(identities, renewal)
    pending = {name for name in broken if _is_pending(vault, name)}
    rows = render.list_json(
        identities.values(), broken, loaded, agent_broken, next_renewal, pending
    )
    if args.json:
        _say(render.to_json(rows))
    else:
        _say(render.list_text(rows, identities))
    return 0


def _is_pending(vault: Vault, name: str) -> bool:
    """An EST enrollment waiting for its certificate, which ``list`` does not call broken."""
    from agent.identity import PENDING_FORMAT

    try:
        metadata = vault.read_metadata(name)
    except AgentError:
        return False
    return isinstance(metadata, dict) and metadata.get("format") == PENDING_FORMAT


def _next_renewals(
    identities: dict[str, Identity], agent_report: dict[str, object]
) -> dict[str, str]:
    """When each EST identity renews: the running agent's schedule (jitter and
    retries included), else the nominal two thirds of its lifetime."""
    if not any(i.source.get("kind") == "est" for i in identities.values()):
        return {}  # spare the import of the enrollment stack
    from datetime import UTC, datetime

    from agent.renewal import renewable, renewal_due

    times: dict[str, str] = {}
    for name, identity in identities.items():
        if not renewable(identity):
            continue
        report = agent_report.get(name)
        scheduled = report.get("next_renewal") if isinstance(report, dict) else None
        if isinstance(scheduled, str):
            times[name] = scheduled
        else:
            times[name] = datetime.fromtimestamp(renewal_due(identity), UTC).isoformat()
    return times


def cmd_unlock(args: argparse.Namespace) -> int:
    control = _control()
    control.get("/v1/status")  # no agent: say so before asking for anything
    backend = None
    if args.remember:  # an insecure keyring is refused before the passphrase is even asked
        from agent.remember import secure_backend

        backend = secure_backend()
    if args.passphrase_file is not None:
        passphrase = prompt.read_passphrase_file(args.passphrase_file)
    else:
        passphrase = prompt.ask("Vault passphrase: ", "passphrase", "--passphrase-file")
        if not passphrase:
            raise AgentError("the passphrase is empty.")
    body: dict[str, object] = {"passphrase": passphrase}
    if args.timeout is not None:
        body["timeout"] = args.timeout
    try:
        answer = control.post("/v1/unlock", body, timeout=UNLOCK_TIMEOUT)
    except ControlError as exc:
        if exc.code == "bad-passphrase":
            raise AgentError("wrong passphrase.") from None
        raise
    loaded = answer.get("loaded") or []
    _say(f"unlocked: {len(loaded)} {'identity' if len(loaded) == 1 else 'identities'} loaded")
    broken = answer.get("broken") or {}
    for name, reason in sorted(broken.items()):
        _warn(f"identity '{name}' was not loaded: {reason}")
    if backend is not None:
        _remember(passphrase, backend)
    return 0


def _remember(passphrase: str, backend: str) -> None:
    from agent.remember import describe, store

    try:
        store(default_paths().vault_dir, passphrase, backend)
    except KeyringError as exc:
        raise KeyringError(
            f"the agent is unlocked, but the passphrase was not remembered: {exc.message}"
        ) from None
    _say(f"remembered the passphrase in {describe(backend)}: the agent unlocks itself at start")


def cmd_passphrase(args: argparse.Namespace) -> int:
    vault = _vault()
    if not vault.exists():
        raise AgentError("there is no vault yet; create one with 'agentctl init'.")
    if args.passphrase_file == "-" and args.new_passphrase_file == "-":
        raise AgentError("only one of --passphrase-file and --new-passphrase-file can be '-'.")
    if args.passphrase_file is not None:
        old = prompt.read_passphrase_file(args.passphrase_file)
    else:
        old = prompt.ask("Current vault passphrase: ", "passphrase", "--passphrase-file")
    if args.new_passphrase_file is not None:
        new = prompt.read_passphrase_file(args.new_passphrase_file)
    else:
        new = prompt.ask_new_passphrase("--new-passphrase-file", "the vault was left as it was")
    remembered = _remembered_backend(vault.directory)  # read before the vault changes
    try:
        vault.change_passphrase(old, new)
    except BadPassphrase:
        raise AgentError("wrong passphrase; the vault was left as it was.") from None
    _say("changed the vault passphrase: the next unlock takes the new one")
    _audit("passphrase")
    if remembered is not None:
        _remember_again(vault.directory, new, remembered)
    return 0


def _remembered_backend(vault_dir: Path) -> str | None:
    """The keyring that holds this vault's passphrase, if any; a marker that
    cannot be read is a warning, not a reason to leave the passphrase as it is."""
    from agent.remember import read_marker

    try:
        remembered = read_marker(vault_dir)
    except KeyringError as exc:
        _warn(f"{exc.message}; no remembered passphrase will be replaced")
        return None
    return None if remembered is None else remembered.backend


def _remember_again(vault_dir: Path, passphrase: str, backend: str) -> None:
    """The OS keyring gets the new passphrase too, or the agent would start
    locked; only the backend ``unlock --remember`` would choose now, so that a
    marker naming some other backend never puts the passphrase in a file."""
    from agent.remember import describe, secure_backend, store

    stale = (
        f"{describe(backend)} still holds the old passphrase; run 'agentctl unlock"
        " --remember' again, or 'agentctl forget'"
    )
    try:
        if secure_backend() != backend:
            _warn(f"{stale} (it is not the keyring this session would store in)")
            return
        store(vault_dir, passphrase, backend)
    except KeyringError as exc:
        _warn(f"{stale} ({exc.message})")
        return
    _say(f"remembered the new passphrase in {describe(backend)}")


def cmd_forget(args: argparse.Namespace) -> int:
    from agent.remember import describe, forget

    backend = forget(default_paths().vault_dir)
    if backend is None:
        _say("no passphrase is remembered for this vault")
    else:
        _say(f"removed the passphrase from {describe(backend)}: the agent will start locked")
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    _control().post("/v1/lock")
    _say("locked")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    control = _control()
    try:
        status = control.get("/v1/status")
    except AgentNotRunning:
        if args.json:
            proxy, control_path = client_sockets()
            doc = {
                "state": "not-running",
                "sockets": {"proxy": str(proxy), "control": str(control_path)},
            }
            _say(render.to_json(doc))
        raise
    _say(render.to_json(status) if args.json else render.status_text(status))
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    proxy, _ = client_sockets()
    _say(f"export {SOCK_ENV}={shlex.quote(str(proxy))}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    vault = _vault()
    vault.remove(args.name)
    _audit("remove", identity=args.name)
    _say(f"removed {args.name}")
    _reload_agent()
    return 0
