"""``agentctl log``: the audit log, as text or as its own JSON lines.

Reads the file directly (no agent needed), like ``tail``: ``--follow``
polls for new lines and follows the file across the agent's rotations,
finishing the old file before it moves to the new one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path
from typing import BinaryIO

from agent.errors import AgentError
from agent.paths import default_paths
from cli import render
from cli.commands import _warn

POLL_INTERVAL = 0.2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f", "--follow", action="store_true", help="keep printing entries as they are written"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the JSON lines as stored, one per line"
    )
    parser.add_argument(
        "-n",
        "--lines",
        metavar="N",
        type=_count,
        help="start with only the last N entries",
    )


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of entries")
    return int(text)


class _Tail:
    """Complete lines appended to a file, across renames and truncation."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None
        self._ident: tuple[int, int] | None = None
        self._partial = b""

    def read(self) -> list[bytes]:
        data = self._partial + (self._file.read() if self._file is not None else b"")
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            info = None
        if info is not None and (info.st_dev, info.st_ino) != self._ident:
            lines = data.split(b"\n")[:-1]  # the old file is done; a cut line stays cut
            if self._file is not None:
                self._file.close()
            try:
                self._file = open(self.path, "rb")  # noqa: SIM115 (kept open to follow it)
            except OSError as exc:
                reason = (exc.strerror or str(exc)).lower()
                raise AgentError(f"cannot read the audit log {self.path}: {reason}.") from None
            opened = os.fstat(self._file.fileno())  # the file opened, not the one stat saw
            self._ident = (opened.st_dev, opened.st_ino)
            self._partial = b""
            return lines + self.read()
        if info is not None and self._file is not None and info.st_size < self._file.tell():
            self._file.seek(0)  # truncated in place
            data = self._file.read()
        *lines, self._partial = data.split(b"\n")
        return lines


def _show(lines: list[bytes], as_json: bool) -> None:
    for raw in lines:
        text = raw.decode("utf-8", "replace")
        if not as_json:
            with contextlib.suppress(ValueError, AttributeError):  # not ours: shown as it is
                text = render.audit_text(json.loads(text))
        print(text, flush=True)


def cmd_log(args: argparse.Namespace) -> int:
    path = default_paths().audit_log
    tail = _Tail(path)
    lines = tail.read()
    if args.lines is not None:
        lines = lines[-args.lines :] if args.lines else []
    if not path.exists() and not args.follow:
        _warn(f"there is no audit log yet ({path}); the agent starts it")
        return 0
    _show(lines, args.json)
    while args.follow:
        time.sleep(POLL_INTERVAL)
        _show(tail.read(), args.json)
    return 0
