"""Secrets from the user: a terminal prompt, or a file for scripts.

Never from the command line (it shows in ``ps`` and shell history). A file
(``-`` is standard input) loses exactly one trailing newline, as ``echo``
and editors add one; anything else in it is the secret. Prompts go through
``getpass`` (which talks to /dev/tty without echo); with no terminal on
standard input we refuse at once rather than hang or read a pipe by surprise.
"""

from __future__ import annotations

import getpass
import sys

from agent.errors import AgentError


class SecretError(AgentError):
    """A passphrase or password could not be obtained."""


def read_secret_file(path: str, what: str) -> bytes:
    """The bytes of ``path`` (``-``: standard input) less one trailing newline.

    ``what`` names the secret in errors ("passphrase", "PKCS#12 password").
    An empty result is refused: it is almost always a wrong path or an
    empty pipe, not a real secret.
    """
    where = "standard input" if path == "-" else path
    if path == "-" and _have_terminal():
        # Typed at a terminal it would be echoed: the prompt is the way for that.
        raise SecretError(
            f"standard input is a terminal; leave out the file option to be asked for "
            f"the {what} without echo."
        )
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise SecretError(f"cannot read the {what} from {where}: {reason}.") from None
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise SecretError(f"the {what} from {where} is empty.")
    return data


def read_passphrase_file(path: str) -> str:
    """A vault passphrase from a file: UTF-8 text, one trailing newline dropped."""
    data = read_secret_file(path, "passphrase")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        where = "standard input" if path == "-" else path
        raise SecretError(f"the passphrase in {where} is not UTF-8 text.") from None


def ask(prompt: str, what: str, option: str) -> str:
    """One answer typed on the terminal, not echoed.

    ``option`` is the flag that avoids the prompt, named in the error given
    when there is no terminal to ask on.
    """
    if not _have_terminal():
        raise SecretError(f"no terminal to ask for the {what}; use {option}.")
    try:
        return getpass.getpass(prompt)
    except EOFError:
        print(file=sys.stderr)
        raise SecretError(f"no {what} was given.") from None


def p12_password(password_file: str | None, shown: str) -> bytes | None:
    """The PKCS#12 password: from ``--p12-password-file``, else asked for
    ``shown`` (the file or URL); an empty answer means the file has none."""
    if password_file is not None:
        return read_secret_file(password_file, "PKCS#12 password")
    typed = ask(f"PKCS#12 password for {shown}: ", "PKCS#12 password", "--p12-password-file")
    return typed.encode("utf-8") or None


def ask_new_passphrase(option: str, unchanged: str = "nothing was created") -> str:
    """A new vault passphrase, typed twice; refuses an empty one or a mismatch.

    ``unchanged`` ends the refusal: what was therefore left as it was.
    """
    first = ask("New vault passphrase: ", "passphrase", option)
    if not first:
        raise SecretError(f"the passphrase is empty; {unchanged}.")
    second = ask("Repeat the passphrase: ", "passphrase", option)
    if first != second:
        raise SecretError(f"the passphrases do not match; {unchanged}.")
    return first


def _have_terminal() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except ValueError:  # stdin closed
        return False
