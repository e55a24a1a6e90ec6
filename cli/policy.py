"""Caller rules on the command line: the ``--allow-*`` flags and ``agentctl policy``.

``add_caller_rule_flags`` and ``caller_rules_from`` are shared by every
command that stores an identity (``import``, ``enroll``), so the flags read
the same everywhere. Paths are resolved here, on the user's machine, because
the kernel reports a caller's executable with its symlinks resolved: a rule
naming ``/usr/bin/python3`` would otherwise never match.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
from typing import Any

from agent.errors import AgentError, IdentityError
from agent.paths import default_paths
from agent.policy import NO_RULES, CallerRules
from cli import render
from cli.commands import _audit, _reload_agent, _say, _vault, _warn

RULES_HELP = (
    "Only callers that match every kind of rule given may use the identity (within one "
    "kind, any listed value will do); with none, any process the proxy socket lets in. "
    "Two identities may share a host pattern when both have rules: each caller then "
    "gets the one whose rules it matches."
)


def add_caller_rule_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--allow-uid/-gid/-exe/-exe-sha256`` (each repeatable) to ``parser``."""
    group = parser.add_argument_group("caller rules", RULES_HELP)
    group.add_argument(
        "--allow-uid",
        metavar="UID",
        action="append",
        default=[],
        help="a user (number or name) whose processes may use it",
    )
    group.add_argument(
        "--allow-gid",
        metavar="GID",
        action="append",
        default=[],
        help="a group (number or name): processes whose effective group it is may use it",
    )
    group.add_argument(
        "--allow-exe",
        metavar="PATH",
        action="append",
        default=[],
        help="an executable whose processes may use it (absolute; symlinks are resolved)",
    )
    group.add_argument(
        "--allow-exe-sha256",
        metavar="HEX",
        action="append",
        default=[],
        help="the SHA-256 of an executable whose processes may use it (as sha256sum prints)",
    )


def _user(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise IdentityError(f"--allow-uid: there is no user named '{text}'") from None


def _group(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise IdentityError(f"--allow-gid: there is no group named '{text}'") from None


def _executable(text: str) -> str:
    if not os.path.isabs(text):
        raise IdentityError(f"--allow-exe '{text}' must be an absolute path, like /usr/bin/curl")
    resolved = os.path.realpath(text)
    if resolved != os.path.normpath(text):
        _warn(f"note: {text} is a link to {resolved}; the rule names {resolved}")
    if not os.path.isfile(resolved):
        _warn(f"note: there is no file {resolved} yet; the rule names it anyway")
    return resolved


def caller_rules_from(args: argparse.Namespace) -> CallerRules:
    """The rules the ``--allow-*`` flags of ``args`` ask for (empty when none)."""
    rules = CallerRules(
        uids=tuple(_user(v) for v in args.allow_uid),
        gids=tuple(_group(v) for v in args.allow_gid),
        exes=tuple(_executable(v) for v in args.allow_exe),
        exe_sha256=tuple(args.allow_exe_sha256),
    )
    _note_unreachable_uids(rules)
    return rules


def _note_unreachable_uids(rules: CallerRules) -> None:
    """A uid rule only narrows: the proxy socket must let that user in first."""
    if not rules.uids:
        return
    from agent.config import load_config

    try:
        admitted = {os.getuid(), *load_config(default_paths().config_file).proxy_allow_uids}
    except AgentError:
        return  # the agent will say what is wrong with its config
    for uid in rules.uids:
        if uid not in admitted:
            _warn(
                f"note: uid {uid} reaches the proxy socket only if proxy.allow_uids in "
                "config.toml lists it"
            )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the identity")
    add_caller_rule_flags(parser)
    parser.add_argument(
        "--clear", action="store_true", help="remove every rule: any caller may use it"
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def cmd_policy(args: argparse.Namespace) -> int:
    from agent.enroll import set_caller_rules
    from agent.identity import Identity

    vault = _vault()
    if not vault.exists():
        raise AgentError("there is no vault yet; create one with 'agentctl init'.")
    rules = caller_rules_from(args)
    if args.clear and rules:
        raise AgentError("give either --clear or --allow-* rules, not both.")
    if args.clear or rules:
        identity = set_caller_rules(vault, args.name, NO_RULES if args.clear else rules)
        _audit("policy", identity=identity.name, callers=identity.callers.to_metadata())
        _reload_agent()
    else:
        identity = Identity.from_metadata(args.name, vault.read_metadata(args.name))
    doc: dict[str, Any] = {"name": identity.name, "callers": identity.callers.to_metadata()}
    _say(render.to_json(doc) if args.json else render.policy_text(identity))
    return 0
