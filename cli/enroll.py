"""``agentctl enroll`` and ``agentctl renew``: identities from servers.

Like the other commands: gather input (secrets from a file or the terminal,
never the command line), call ``agent.enroll`` or the running agent, print.
Enrollment runs here, in the CLI, so it works whether the agent is locked,
unlocked or not running (storing needs only the vault's public key);
renewal needs the current key for mTLS, which only the unlocked agent
holds, so ``renew`` asks the agent.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import urllib.parse

from agent.errors import AgentError, EnrollmentPending
from cli import prompt, render
from cli.commands import _audit, _control, _read_file, _reload_agent, _say, _vault
from cli.policy import caller_rules_from

#: A renewal may wait out 202 answers (the agent allows 60 s) on top of its requests.
RENEW_TIMEOUT = 180.0

_EST_ONLY = ("label", "subject", "san", "key_type", "username", "password_file", "wait")
_PKCS12_ONLY = ("p12_password_file", "replace")


def cmd_enroll(args: argparse.Namespace) -> int:
    _refuse_options_of_the_other_flow(args)
    try:
        if args.p12_url is not None:
            return _enroll_pkcs12(args)
        return _enroll_est(args)
    except EnrollmentPending as exc:
        raise AgentError(
            f"cannot enroll {args.name} yet: {render.sentence(exc.message)} The key and the"
            " request are kept in the vault: run the same command again later to resume."
        ) from None
    except AgentError as exc:
        raise AgentError(f"cannot enroll {args.name}: {render.sentence(exc.message)}") from None


def _refuse_options_of_the_other_flow(args: argparse.Namespace) -> None:
    est = args.est is not None
    for option in _PKCS12_ONLY if est else _EST_ONLY:
        value = getattr(args, option)
        if value not in (None, False, []):
            flag = "--" + option.replace("_", "-")
            raise AgentError(f"{flag} is for {'--p12-url' if est else '--est'} enrollment only.")


def _enroll_pkcs12(args: argparse.Namespace) -> int:
    from agent.audit import identity_fields
    from agent.enroll import check_can_store, fetch_pkcs12, import_pkcs12
    from agent.webclient import check_https_url, display_url

    vault = _vault()
    callers = caller_rules_from(args)
    check_can_store(vault, args.name, args.host, replace=args.replace, callers=callers)
    url = check_https_url(args.p12_url, "PKCS#12")
    server_ca = None if args.ca is None else _read_file(args.ca, "the CA bundle")
    upstream_ca = _upstream_ca(args, default=None)
    token = _secret(args.token_file, "registration token", "--token-file")
    data = asyncio.run(fetch_pkcs12(url, token, ca_pem=server_ca, pins=args.pin))
    del token
    password = prompt.p12_password(args.p12_password_file, display_url(url))
    identity = import_pkcs12(
        vault,
        args.name,
        data,
        password,
        args.host,
        ca_pem=None if isinstance(upstream_ca, str) else upstream_ca,
        pins=args.upstream_pin,
        min_tls=args.min_tls,
        source={"kind": "pkcs12-url", "url": display_url(url)},
        replace=args.replace,
        callers=callers,
    )
    _say(render.imported_line(identity))
    _audit("enroll", **identity_fields(identity))
    _reload_agent()
    return 0


def _enroll_est(args: argparse.Namespace) -> int:
    from agent.audit import identity_fields
    from agent.enroll import UPSTREAM_FROM_CACERTS, EstEnrollment, enroll_est
    from agent.est import basic_authorization, bearer_authorization
    from agent.renewal import renewal_due

    if args.username is not None and args.token_file is not None:
        raise AgentError("give either --username (HTTP Basic) or --token-file, not both.")
    if args.password_file is not None and args.username is None:
        raise AgentError("--password-file goes with --username.")
    authorization = None
    if args.username is not None:
        password = _secret(args.password_file, "EST password", "--password-file")
        authorization = basic_authorization(args.username, password)
    elif args.token_file is not None:
        authorization = bearer_authorization(_secret(args.token_file, "token", "--token-file"))
    order = EstEnrollment(
        name=args.name,
        url=args.est if args.label is None else _labelled(args.est, args.label),
        hosts=tuple(args.host),
        subject=args.subject,
        sans=tuple(args.san),
        key_type=args.key_type or "ec-p256",
        server_ca_pem=None if args.ca is None else _read_file(args.ca, "the CA bundle"),
        server_pins=tuple(args.pin),
        authorization=authorization,
        upstream_ca=_upstream_ca(args, default=UPSTREAM_FROM_CACERTS),
        upstream_pins=tuple(args.upstream_pin),
        min_tls=args.min_tls,
        wait=args.wait if args.wait is not None else 300.0,
        callers=caller_rules_from(args),
    )
    identity = asyncio.run(enroll_est(_vault(), order, progress=_progress))
    _say(render.enrolled_line(identity, renewal_due(identity)))
    _audit("enroll", **identity_fields(identity))
    _reload_agent()
    return 0


def _labelled(url: str, label: str) -> str:
    from agent.est import est_url

    return est_url(url, label)


def _upstream_ca(args: argparse.Namespace, default: str | None) -> bytes | str | None:
    """``--upstream-ca``: a PEM file, or the word ``system``; else ``default``."""
    if args.upstream_ca is None:
        return default
    if args.upstream_ca == "system":
        return "system"
    return _read_file(args.upstream_ca, "the upstream CA bundle")


def _secret(path: str | None, what: str, option: str) -> bytes:
    """A secret from ``path`` (``-``: standard input), else asked without echo."""
    if path is not None:
        return prompt.read_secret_file(path, what)
    typed = prompt.ask(f"{what[0].upper()}{what[1:]}: ", what, option)
    if not typed:
        raise AgentError(f"the {what} is empty.")
    return typed.encode("utf-8")


def _progress(line: str) -> None:
    print(f"agentctl: {render.sentence(line)}", file=sys.stderr, flush=True)


def cmd_renew(args: argparse.Namespace) -> int:
    name = urllib.parse.quote(args.name, safe="")
    summary = _control().post(f"/v1/renew/{name}", timeout=RENEW_TIMEOUT)
    _say(render.to_json(summary) if args.json else render.renewed_line(summary))
    return 0
