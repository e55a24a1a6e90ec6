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

from agent.errors import AgentError, AgentNotRunning, IdentityError
from agent.paths import SOCK_ENV, client_sockets, default_paths
from cli import prompt, render
from cli.control_client import UNLOCK_TIMEOUT, ControlClient, ControlError


def _vault():  # type: ignore[no-untyped-def]
    from agent.vault import Vault

    return Vault(default_paths().vault_dir)


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
    from agent.enroll import import_pkcs12
    from agent.vault import check_name

    check_name(args.name)
    vault = _vault()
    if not vault.exists():
        raise AgentError("there is no vault yet; create one with 'agentctl init'.")
    if not args.replace and args.name in vault.names():
        raise AgentError(
            f"an identity named '{args.name}' already exists; use --replace to overwrite it."
        )
    data = _read_file(args.file, "the PKCS#12 file")
    ca_pem = None if args.ca is None else _read_file(args.ca, "the CA bundle")
    password: bytes | None
    if args.p12_password_file is not None:
        password = prompt.read_secret_file(args.p12_password_file, "PKCS#12 password")
    else:
        typed = prompt.ask(
            f"PKCS#12 password for {args.file}: ", "PKCS#12 password", "--p12-password-file"
        )
        password = typed.encode("utf-8") or None
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
        )
    except IdentityError as exc:
        raise IdentityError(f"cannot import {args.file}: {render.sentence(exc.message)}") from None
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
    rows = render.list_json(identities.values(), broken, loaded, agent_broken)
    if args.json:
        _say(render.to_json(rows))
    else:
        _say(render.list_text(rows, identities))
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    control = _control()
    control.get("/v1/status")  # no agent: say so before asking for anything
    if args.passphrase_file is not None:
        passphrase = prompt.read_passphrase_file(args.passphrase_file)
    else:
        passphrase = prompt.ask("Vault passphrase: ", "passphrase", "--passphrase-file")
        if not passphrase:
            raise AgentError("the passphrase is empty.")
    try:
        answer = control.post("/v1/unlock", {"passphrase": passphrase}, timeout=UNLOCK_TIMEOUT)
    except ControlError as exc:
        if exc.code == "bad-passphrase":
            raise AgentError("wrong passphrase.") from None
        raise
    loaded = answer.get("loaded") or []
    _say(f"unlocked: {len(loaded)} identities loaded")
    broken = answer.get("broken") or {}
    for name, reason in sorted(broken.items()):
        _warn(f"identity '{name}' was not loaded: {reason}")
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
    _say(f"removed {args.name}")
    _reload_agent()
    return 0
