"""Outside programs the tests use, and small helpers around them.

The project's rule: a test that needs an outside part (nginx, curl, openssl,
gnome-keyring, systemd-analyze, ...) skips only on a developer's machine that
lacks it; under CI (``CI=true``) a missing part is a failure, because a green
run that skipped the real peers would prove nothing. ``require_tool`` is the
one place that rule lives.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

#: Searched after PATH: Debian keeps nginx and friends in sbin, which a normal
#: user's PATH often lacks.
EXTRA_TOOL_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def in_ci() -> bool:
    """True when running under CI (``CI=true``), where nothing may be skipped."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def find_tool(name: str) -> str | None:
    """The absolute path of the program ``name``, or None (PATH, then sbin folders)."""
    path = os.environ.get("PATH", os.defpath)
    search = os.pathsep.join([path, *EXTRA_TOOL_DIRS])
    found = shutil.which(name, path=search)
    return os.path.abspath(found) if found else None


def require_tool(name: str) -> str:
    """The absolute path of ``name``; fail under CI, skip elsewhere, when it is missing."""
    found = find_tool(name)
    if found:
        return found
    reason = f"{name!r} is not installed (scripts/test installs it on Debian)"
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)
    raise AssertionError("unreachable")  # pytest.skip raises; this keeps type checkers calm


# --- deterministic content for big bodies -----------------------------------

CHUNK = 1 << 20


@contextlib.contextmanager
def traversable_by_others(*paths: Path) -> Iterator[None]:
    """Let other users pass through (not list) every folder above ``paths``.

    A test that runs this checkout's venv as a second OS user needs it: the
    checkout may sit in a private folder (a ``mktemp -d`` is 0700). Only the
    search bit is added, only where it is missing, and taken back afterwards.
    """
    changed: dict[Path, int] = {}
    for path in paths:
        for folder in [Path(path).resolve(), *Path(path).resolve().parents]:
            mode = folder.stat().st_mode
            if folder not in changed and not mode & 0o001:
                changed[folder] = mode
                os.chmod(folder, (mode | 0o001) & 0o7777)
    try:
        yield
    finally:
        for folder, mode in changed.items():
            os.chmod(folder, mode & 0o7777)


def deterministic_chunks(seed: str, size: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """``size`` pseudo-random bytes for ``seed``, the same on every run, chunk by chunk.

    AES-256-CTR's key stream: GB/s, so a test can make or compare hundreds of
    MiB without holding them in memory.
    """
    key = hashlib.sha256(seed.encode()).digest()
    encryptor = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    zeros = bytes(chunk)
    left = size
    while left > 0:
        n = min(chunk, left)
        yield encryptor.update(zeros if n == chunk else bytes(n))
        left -= n


def deterministic_sha256(seed: str, size: int) -> str:
    """The hex SHA-256 of ``deterministic_chunks(seed, size)``."""
    digest = hashlib.sha256()
    for block in deterministic_chunks(seed, size):
        digest.update(block)
    return digest.hexdigest()


def write_deterministic_file(path: Path, seed: str, size: int) -> str:
    """Write ``size`` deterministic bytes to ``path``; return their hex SHA-256."""
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        for block in deterministic_chunks(seed, size):
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


# --- curl ---------------------------------------------------------------------


@dataclass
class CurlResult:
    """What real curl saw: exit code, the final response's status and headers, body."""

    args: list[str]
    returncode: int
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    stderr: str = ""

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        """Every value of header ``name`` in order: repeated headers stay repeated."""
        lower = name.lower()
        return [v for k, v in self.headers if k.lower() == lower]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def parse_header_dump(raw: bytes) -> tuple[int, list[tuple[str, str]]]:
    """The status and headers of the last response in a ``curl -D`` dump (1xx skipped)."""
    blocks = [b for b in raw.replace(b"\r\n", b"\n").split(b"\n\n") if b.strip()]
    if not blocks:
        return 0, []
    lines = blocks[-1].decode("latin-1").split("\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.append((name.strip(), value.strip()))
    return status, headers


def curl(
    *args: str | os.PathLike[str],
    input: bytes | None = None,
    output: Path | None = None,
    timeout: float = 60,
) -> CurlResult:
    """Run real curl with ``args`` (URL included) and return what it saw.

    Adds ``-sS`` and a header dump; the body is read back unless ``output``
    names a file for it (use that for big downloads). Never raises on curl's
    exit code: check ``returncode`` (0 is success, 60 an untrusted server...).
    """
    exe = require_tool("curl")
    with tempfile.TemporaryDirectory(prefix="mt-curl-") as tmp:
        head = Path(tmp) / "head"
        body = output if output is not None else Path(tmp) / "body"
        cmd = [exe, "-sS", "-D", str(head), "-o", str(body), *map(os.fspath, args)]
        proc = subprocess.run(
            cmd,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        status, headers = parse_header_dump(head.read_bytes()) if head.exists() else (0, [])
        data = b""
        if output is None and body.exists():
            data = body.read_bytes()
    return CurlResult(
        args=cmd,
        returncode=proc.returncode,
        status=status,
        headers=headers,
        body=data,
        stderr=proc.stderr.decode("utf-8", "replace"),
    )


_LOCK_HOLDER = """
import fcntl, sys
with open(sys.argv[1]) as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def locked_by_another_process(lock_file: Path) -> Iterator[None]:
    """Another process holds ``flock`` on ``lock_file`` (the vault's writer
    lock, say) from the moment the block starts until it ends."""
    with subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(lock_file)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    ) as holder:  # fmt: skip
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == "locked\n"
        try:
            yield
        finally:
            holder.stdin.close()
            holder.wait(timeout=10)
