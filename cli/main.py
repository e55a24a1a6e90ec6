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
from collections.abc import Callable, Sequence

from agent import __version__
from agent.errors import AgentError
from cli import background, commands, enroll, log, policy, render, service

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: Options a user may reach for to pass a secret; refused before argparse echoes them.
_SECRET_OPTIONS = frozenset(
    {"--passphrase", "--password", "--pass", "--p12-password", "--pw", "--secret", "--token"}
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
    policy.add_caller_rule_flags(p)
    p.set_defaults(run=commands.cmd_import)

    _enrollment_commands(command)

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
        "is 0 as long as the passphrase was right. With --remember the passphrase is also "
        "kept in the OS keyring (macOS Keychain, Secret Service on Linux) and the agent "
        "unlocks itself whenever it starts; where only an insecure keyring exists, "
        "--remember refuses before anything is sent.",
    )
    _passphrase_file(p)
    p.add_argument(
        "--remember",
        action="store_true",
        help="keep the passphrase in the OS keyring: the agent unlocks itself at start "
        "('agentctl forget' undoes it)",
    )
    p.add_argument(
        "--timeout",
        metavar="DURATION",
        type=_duration,
        help="lock again after this long, busy or not (like 30m or 8h; 0: never), "
        "instead of the configured max_unlocked, for this unlock only",
    )
    p.set_defaults(run=commands.cmd_unlock)

    p = command(
        "passphrase",
        "change the vault passphrase",
        "Change the passphrase that protects the vault: only the vault key is wrapped "
        "again, every identity stays as it is. Works whether the agent is locked, "
        "unlocked or not running; a passphrase remembered with 'unlock --remember' is "
        "replaced too. The new passphrase is asked twice on the terminal.",
    )
    p.add_argument(
        "--passphrase-file",
        metavar="PATH",
        help="read the current passphrase from PATH instead of the terminal ('-': standard input)",
    )
    p.add_argument(
        "--new-passphrase-file",
        metavar="PATH",
        help="read the new passphrase from PATH instead of the terminal ('-': standard input)",
    )
    p.set_defaults(run=commands.cmd_passphrase)

    p = command(
        "forget",
        "remove the remembered passphrase from the OS keyring",
        "Remove the vault passphrase that 'unlock --remember' stored in the OS keyring; "
        "the agent then starts locked. Does not lock a running agent.",
    )
    p.set_defaults(run=commands.cmd_forget)

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
        "start",
        "run the agent in the background (without a service manager)",
        "Start mtls-agent detached from the terminal (its output goes to agent.log in the "
        "log folder), wait until its sockets answer, and print the sh lines that point "
        'clients at it, as ssh-agent does: eval "$(agentctl start)". If an agent is '
        "already running, print its lines and start nothing. With a service manager, use "
        "'agentctl service install' instead.",
    )
    p.set_defaults(run=background.cmd_start)

    p = command(
        "stop",
        "stop the running agent",
        "Stop the running agent cleanly (SIGTERM: keys dropped, connections closed, its "
        "sockets removed) and wait until it is gone. An agent started by a service manager "
        "is started again by it on the next connection.",
    )
    p.set_defaults(run=background.cmd_stop)

    p = command(
        "service",
        "install, remove or inspect the user service (systemd, launchd)",
        "Run the agent as a user service with socket activation: systemd user units on "
        "Linux, a LaunchAgent on macOS.",
    )
    service.add_service_arguments(p)
    p.set_defaults(run=service.cmd_service)

    p = command(
        "remove",
        "remove an identity from the vault",
        "Delete an identity from the vault; a running agent unloads it.",
    )
    p.add_argument("name", metavar="NAME")
    p.set_defaults(run=commands.cmd_remove)

    p = command(
        "policy",
        "show or change which processes may use an identity",
        "Show an identity's caller rules, or replace them with the --allow-* rules given "
        "(--clear removes them all). A running agent applies the change at once.",
    )
    policy.add_arguments(p)
    p.set_defaults(run=policy.cmd_policy)

    p = command(
        "log",
        "show the audit log",
        "Print the audit log: one entry per forwarded request (time, identity, method, host, "
        "path without its query, status, body bytes each way, duration, and the calling "
        "process's pid, uid and executable) and per unlock, failed unlock, lock, import, "
        "removal, renewal and rule change. No secret, header value or query string is ever "
        "written to it.",
    )
    log.add_arguments(p)
    p.set_defaults(run=log.cmd_log)
    return parser


def _enrollment_commands(command: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    """``enroll`` (PKCS#12 from a registration service, or EST) and ``renew``."""
    p = command(
        "enroll",
        "get an identity from a registration service or an EST server",
        "Get an identity from a server and store it like 'import'. With --p12-url: fetch "
        "a PKCS#12 file over verified TLS, sending the token (--token-file, else asked) "
        "only to a server that passes --ca and --pin. With --est: make the key here "
        "(sealed in the vault before the request is sent), send only a certificate request "
        "to the EST server (RFC 7030), and store the certificate; while the server answers "
        "'not yet' (202) the request is sent again, up to --wait seconds, and running the "
        "same command later resumes it. EST identities are renewed by the agent at two "
        "thirds of their lifetime. Works whether the agent is locked, unlocked or not running.",
    )
    p.add_argument("name", metavar="NAME", help="the identity's name (letters, digits, . _ -)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--p12-url", metavar="URL", help="https URL of the PKCS#12 file")
    source.add_argument(
        "--est", metavar="URL", help="the EST server, like https://ca.example.com/.well-known/est"
    )
    p.add_argument(
        "--host",
        metavar="PATTERN",
        action="append",
        required=True,
        help="a host this identity is presented to (repeat for several)",
    )
    p.add_argument("--ca", metavar="CA.pem", help="trust only these CAs for the enrollment "
                   "server (default: the system trust store)")  # fmt: skip
    p.add_argument(
        "--pin",
        metavar="sha256//B64",
        action="append",
        default=[],
        help="refuse an enrollment server whose public key does not match (repeatable); "
        "checked before anything is sent",
    )
    p.add_argument("--token-file", metavar="PATH", help="read the bearer token from PATH "
                   "('-': standard input); with --p12-url it is asked if not given")  # fmt: skip
    p.add_argument(
        "--upstream-ca",
        metavar="CA.pem|system",
        help="the CAs the identity trusts for its upstreams (default: the EST server's "
        "/cacerts with --est, the system trust store with --p12-url)",
    )
    p.add_argument(
        "--upstream-pin",
        metavar="sha256//B64",
        action="append",
        default=[],
        help="require the upstream's public key to match this pin (repeatable)",
    )
    p.add_argument(
        "--min-tls", choices=["1.2", "1.3"], default="1.2", help="minimum TLS version (1.2)"
    )
    p.add_argument(
        "--p12-password-file",
        metavar="PATH",
        help="--p12-url: read the PKCS#12 password from PATH ('-': standard input)",
    )
    p.add_argument(
        "--replace", action="store_true", help="--p12-url: overwrite an identity of that name"
    )
    p.add_argument("--label", metavar="LABEL", help="--est: the CA label (a path segment)")
    p.add_argument("--subject", metavar="DN", help="--est: the subject, like CN=me,O=Example "
                   "(default: CN=NAME)")  # fmt: skip
    p.add_argument(
        "--san",
        metavar="TYPE:VALUE",
        action="append",
        default=[],
        help="--est: a subject alternative name: DNS:..., IP:..., URI:..., EMAIL:... (repeatable)",
    )
    p.add_argument(
        "--key-type",
        choices=["ec-p256", "ec-p384", "rsa-2048", "rsa-3072"],
        help="--est: the key made here (default: ec-p256)",
    )
    p.add_argument("--username", metavar="USER", help="--est: HTTP Basic user name")
    p.add_argument(
        "--password-file",
        metavar="PATH",
        help="--est: read the HTTP Basic password from PATH (else asked)",
    )
    p.add_argument(
        "--wait",
        metavar="SECONDS",
        type=float,
        help="--est: how long to keep asking while the server answers 202 (default: 300)",
    )
    policy.add_caller_rule_flags(p)
    p.set_defaults(run=enroll.cmd_enroll)

    p = command(
        "renew",
        "renew an EST identity now",
        "Have the running, unlocked agent renew an EST identity now (a fresh key, a new "
        "certificate through simplereenroll, swapped in while requests keep flowing) and "
        "print the new expiry. The agent also does this by itself at two thirds of the "
        "certificate's lifetime.",
    )
    p.add_argument("name", metavar="NAME")
    _json(p)
    p.set_defaults(run=enroll.cmd_renew)


def _duration(value: str) -> float:
    """Seconds from ``30``, ``90s``, ``15m``, ``8h`` (config.toml's spelling)."""
    from agent.config import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be {exc}, not {value!r}") from None


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
