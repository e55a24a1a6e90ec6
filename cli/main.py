"""``agentctl``: the command line of mtls-agent.

This module owns the argument grammar (the command names and flags are a
public contract) and the one boundary where errors become exit codes:
every ``AgentError`` is printed as ``agentctl: <sentence>`` and exits 1,
usage errors exit 2 (argparse), Ctrl-C exits 130. No traceback is ever shown
for an expected failure, and no secret is ever printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from agent import __version__
from agent.errors import AgentError
from cli import commands, render

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: Options a user may reach for to pass a secret; refused before argparse echoes them.
_SECRET_OPTIONS = frozenset(
    {"--passphrase", "--password", "--pass", "--p12-password", "--pw", "--secret"}
)

_SECRETS_NOTE = (
    "Secrets are never taken on the command line: they are asked on the terminal "
    "(not echoed), or read from a file given with the *-file option ('-' is standard "
    "input; one trailing newline is dropped; an empty file is refused)."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentctl",
        description="Control mtls-agent, the credential agent for mutual TLS: create the "
        "vault, import client identities, unlock and lock the running agent.",
        epilog=_SECRETS_NOTE,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--version", action="version", version=f"agentctl (mtls-agent) {__version__}"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        # No abbreviations: "--passphrase X" must not pass for "--passphrase-file X".
        return sub.add_parser(name, help=summary, description=description, allow_abbrev=False)

    p = command(
        "init",
        "create the vault",
        "Create the vault that holds your identities, protected by a new passphrase "
        "(asked twice on the terminal). Refuses if a vault already exists.",
    )
    _passphrase_file(p)
    p.set_defaults(run=commands.cmd_init)

    p = command(
        "import",
        "import a PKCS#12 file as an identity",
        "Import a client certificate and key from a PKCS#12 (.p12/.pfx) file, bound to "
        "the given host patterns. The PKCS#12 password is asked on the terminal (an empty "
        "answer means none). Needs no vault passphrase and works whether the agent is "
        "locked, unlocked or not running; a running agent re-reads the vault afterwards.",
    )
    p.add_argument("name", metavar="NAME", help="the identity's name (letters, digits, . _ -)")
    p.add_argument("file", metavar="FILE.p12", help="the PKCS#12 file")
    p.add_argument(
        "--host",
        metavar="PATTERN",
        action="append",
        required=True,
        help="a host this identity is presented to: api.example.com, *.example.com, "
        "optionally :PORT (repeat for several)",
    )
    p.add_argument("--ca", metavar="CA.pem", help="trust only these CAs for the upstream "
                   "(default: the system trust store)")  # fmt: skip
    p.add_argument(
        "--pin",
        metavar="sha256//B64",
        action="append",
        default=[],
        help="require the upstream's public key to match this SPKI pin (repeatable)",
    )
    p.add_argument(
        "--min-tls", choices=["1.2", "1.3"], default="1.2", help="minimum TLS version (1.2)"
    )
    p.add_argument(
        "--p12-password-file",
        metavar="PATH",
        help="read the PKCS#12 password from PATH ('-': standard input)",
    )
    p.add_argument("--replace", action="store_true", help="overwrite an identity of the same name")
    p.set_defaults(run=commands.cmd_import)

    p = command(
        "list",
        "list the identities in the vault",
        "List every identity in the vault (works while locked and without an agent), "
        "whether the running agent has it loaded, and any that cannot be read. "
        "--json prints a list of objects: name, subject, issuer, serial, not_before, "
        "not_after, hosts, fingerprint_sha256, pins, min_tls, source, ca, loaded; "
        'an unreadable identity is {"name": ..., "broken": reason}; one the running '
        'agent could not load keeps its fields and gains "broken". Exits 1 when there '
        "is no vault.",
    )
    _json(p)
    p.set_defaults(run=commands.cmd_list)

    p = command(
        "unlock",
        "unlock the running agent",
        "Send the vault passphrase to the running agent, which loads every identity. "
        "Identities that cannot be loaded are named on standard error; the exit status "
        "is 0 as long as the passphrase was right.",
    )
    _passphrase_file(p)
    p.set_defaults(run=commands.cmd_unlock)

    p = command(
        "lock",
        "lock the running agent",
        "Make the running agent forget every key and close its upstream connections.",
    )
    p.set_defaults(run=commands.cmd_lock)

    p = command(
        "status",
        "show the running agent's state",
        "Show the running agent's state, identities, uptime, requests served, sockets and "
        "broken identities. Exits 1 when no agent is running; with --json it then still "
        'prints {"state": "not-running", "sockets": {...}} on standard output.',
    )
    _json(p)
    p.set_defaults(run=commands.cmd_status)

    p = command(
        "env",
        "print the shell line that points clients at the agent",
        "Print 'export MTLS_AGENT_SOCK=...' for the agent's proxy socket, for "
        'eval "$(agentctl env)".',
    )
    p.set_defaults(run=commands.cmd_env)

    p = command(
        "remove",
        "remove an identity from the vault",
        "Delete an identity from the vault; a running agent unloads it.",
    )
    p.add_argument("name", metavar="NAME")
    p.set_defaults(run=commands.cmd_remove)
    return parser


def _passphrase_file(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--passphrase-file",
        metavar="PATH",
        help="read the vault passphrase from PATH instead of the terminal "
        "('-': standard input; one trailing newline is dropped)",
    )


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON for scripts")


def _secret_on_command_line(argv: Sequence[str]) -> bool:
    """Whether the user tried to pass a secret as an option's value.

    Caught before argparse, whose "unrecognized arguments" error would print
    the secret back to the terminal (and to any log of it).
    """
    for arg in argv:
        if arg == "--":
            return False
        option = arg.split("=", 1)[0]
        if option in _SECRET_OPTIONS:
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Run agentctl; return its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if _secret_on_command_line(argv):
        print(
            "agentctl: passphrases and passwords are never taken on the command line; "
            "use --passphrase-file or --p12-password-file (a file, or '-' for standard input).",
            file=sys.stderr,
        )
        return EXIT_USAGE
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except AgentError as exc:
        print(f"agentctl: {render.sentence(exc.message)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (agentctl list | head): nothing left to say, and
        # the interpreter's final flush of stdout must not fail loudly either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
