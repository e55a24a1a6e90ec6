"""Identities at rest: the only module of the agent that touches raw crypto.

The vault holds one X25519 key pair. Its private half is wrapped with a key
derived from the passphrase; every identity's private key is sealed to the
public half. That split is what lets import, enrollment and renewal store a
key while the agent is locked, makes unlocking one KDF, and makes a
passphrase change rewrite one file.

Layout (the vault folder and ``identities/`` are 0700, every file 0600)::

    vault/
      vault.json          the wrapped vault key (format below)
      .lock               flock()ed by every writer; empty
      .tmp-<random>       a write in progress, or the leftover of a crash
      identities/
        NAME.json         the caller's metadata and the sealed private key
        .tmp-<random>

An identity is one file, so storing, replacing or removing it is one atomic
rename or unlink: whatever moment a crash or a concurrent reader picks, it
sees the old identity whole or the new one whole, never a certificate from
one and a key from the other. The sealed key is ciphertext, so the file
stays readable while locked (``agentctl list``). Anything in ``identities/``
whose stem is not a valid name is ignored.

Formats (JSON, UTF-8; every ``b64`` is standard base64 with padding):

``vault.json``::

    {"format": "mtls-agent-vault", "version": 1,
     "kdf": {"name": "scrypt", "n": N, "r": 8, "p": 3, "salt": b64(16 bytes)},
     "wrap": {"alg": "AES-256-GCM", "nonce": b64(12 bytes), "ct": b64(48 bytes)},
     "public_key": b64(raw X25519 public key, 32 bytes)}

    wrap key  = scrypt(UTF-8 of the NFC-normalised passphrase, salt, n, r, p, 32 bytes)
    ct        = AES-256-GCM(wrap key, nonce, raw X25519 private key (32 bytes),
                            associated data = b"mtls-agent-vault/1" + public key)

  Binding the public key as associated data means a swapped public key fails
  the unwrap instead of silently sealing new identities to someone else. NFC
  normalisation makes the same passphrase typed on macOS and Linux the same
  bytes. Readers refuse kdf parameters outside a small range (n a power of
  two in 2**10..2**20, r 1..16, p 1..4, 128·n·r ≤ 1 GiB), so a crafted
  vault.json cannot make us allocate gigabytes.

``identities/NAME.json``::

    {"format": "mtls-agent-identity", "version": 1,
     "metadata": {... the caller's JSON object, opaque here ...},
     "sealed_key": {"format": "mtls-agent-sealed-key", "version": 1,
                    "alg": "X25519-HKDF-SHA256-AES-256-GCM",
                    "epk": b64(32 bytes), "nonce": b64(12 bytes), "ct": b64}}

    shared    = X25519(ephemeral private key, vault public key)
    aes key   = HKDF-SHA256(shared, salt = epk + vault public key,
                            info = b"mtls-agent sealed key v1", 32 bytes)
    ct        = AES-256-GCM(aes key, nonce, PKCS#8 DER of the private key,
                            associated data = b"mtls-agent/identity/" + UTF-8 NAME)

  The name as associated data means a sealed key copied under another name
  does not open. The unencrypted PKCS#8 exists only in memory.

Writes go to ``.tmp-<random>`` in the target's folder (O_EXCL, 0600), are
fsynced, renamed over the target, and the folder is fsynced. Every writer
holds an exclusive flock on ``.lock`` (polled, up to ``lock_timeout``), and
sweeps ``.tmp-*`` leftovers before writing: only a lock holder ever has a
temporary file in flight, so whatever it finds is a crash's debris. Readers
take no lock; the renames keep what they see whole.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import secrets
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from agent.errors import BadPassphrase, VaultBusy, VaultError
from agent.paths import make_private_dirs

VERSION = 1
VAULT_FORMAT = "mtls-agent-vault"
IDENTITY_FORMAT = "mtls-agent-identity"
SEALED_KEY_FORMAT = "mtls-agent-sealed-key"
WRAP_ALG = "AES-256-GCM"
SEAL_ALG = "X25519-HKDF-SHA256-AES-256-GCM"
WRAP_AAD_PREFIX = b"mtls-agent-vault/1"
SEAL_HKDF_INFO = b"mtls-agent sealed key v1"
SEAL_AAD_PREFIX = b"mtls-agent/identity/"

# OWASP's scrypt settings come in equal-cost pairs; N=2^15, r=8, p=3 costs what
# N=2^17, r=8, p=1 does in CPU but needs 32 MiB instead of 128 MiB, which keeps
# the agent's peak memory at unlock under 100 MB. Stored per vault: older
# vaults keep their own parameters.
DEFAULT_KDF_N = 2**15
KDF_R = 8
KDF_P = 3
KDF_MIN_N = 2**10
KDF_MAX_N = 2**20
KDF_MAX_R = 16
KDF_MAX_P = 4
KDF_MAX_MEMORY = 2**30
SALT_BYTES = 16
NONCE_BYTES = 12
X25519_BYTES = 32
GCM_TAG_BYTES = 16

VAULT_FILE = "vault.json"
IDENTITIES_DIR = "identities"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
IDENTITY_SUFFIX = ".json"
LOCK_POLL_SECONDS = 0.05

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


def check_name(name: str) -> str:
    """Return ``name`` if it is safe as an identity name, else raise VaultError.

    Names become file names, so anything that could climb out of
    ``identities/``, hide as a dotfile or read as an option is refused.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise VaultError(
            f"{name!r} is not a valid identity name: use 1 to 64 letters, digits, "
            "'.', '_' or '-', not starting with '.' or '-'."
        )
    return name


class VaultKey:
    """The unwrapped vault private key, held in memory while unlocked.

    It never prints its secret and refuses to be pickled, so it cannot leak
    into a log line, a traceback or a multiprocessing queue by accident.
    """

    __slots__ = ("_private",)

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private

    @property
    def public_bytes(self) -> bytes:
        """The raw public half; sealed keys are bound to it."""
        return self._private.public_key().public_bytes_raw()

    def exchange(self, peer_public: bytes) -> bytes:
        """X25519 with an ephemeral public key; the private half stays inside."""
        return self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))

    def __repr__(self) -> str:
        return f"VaultKey(public={self.public_bytes.hex()[:16]}...)"

    def __reduce__(self) -> Any:
        raise TypeError("a VaultKey cannot be pickled: it must not leave memory.")


@dataclass(frozen=True)
class _Header:
    """vault.json, parsed and checked."""

    public_key: bytes
    salt: bytes
    n: int
    r: int
    p: int
    nonce: bytes
    ct: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "format": VAULT_FORMAT,
            "version": VERSION,
            "kdf": {
                "name": "scrypt",
                "n": self.n,
                "r": self.r,
                "p": self.p,
                "salt": _b64(self.salt),
            },
            "wrap": {"alg": WRAP_ALG, "nonce": _b64(self.nonce), "ct": _b64(self.ct)},
            "public_key": _b64(self.public_key),
        }

    @classmethod
    def parse(cls, doc: dict[str, Any], path: Path) -> _Header:
        _check_format(doc, VAULT_FORMAT, path)
        kdf = _object(doc, "kdf", path)
        wrap = _object(doc, "wrap", path)
        if kdf.get("name") != "scrypt" or wrap.get("alg") != WRAP_ALG:
            used = f"{kdf.get('name')!r}, {wrap.get('alg')!r}"
            raise _corrupt(path, f"it names a KDF or cipher this version does not use ({used})")
        n, r, p = (_int(kdf, field, path) for field in ("n", "r", "p"))
        if not _kdf_params_allowed(n, r, p):
            raise _corrupt(path, f"its scrypt parameters n={n}, r={r}, p={p} are out of range")
        return cls(
            public_key=_bytes(doc, "public_key", path, X25519_BYTES),
            salt=_bytes(kdf, "salt", path, SALT_BYTES),
            n=n,
            r=r,
            p=p,
            nonce=_bytes(wrap, "nonce", path, NONCE_BYTES),
            ct=_bytes(wrap, "ct", path, X25519_BYTES + GCM_TAG_BYTES),
        )


class Vault:
    """One user's vault folder: the vault key and the identities."""

    def __init__(self, directory: Path, *, lock_timeout: float = 10.0) -> None:
        self.directory = Path(directory)
        self.lock_timeout = lock_timeout

    @property
    def _vault_file(self) -> Path:
        return self.directory / VAULT_FILE

    @property
    def _identities(self) -> Path:
        return self.directory / IDENTITIES_DIR

    def _identity_file(self, name: str) -> Path:
        return self._identities / f"{check_name(name)}{IDENTITY_SUFFIX}"

    def exists(self) -> bool:
        """Whether vault.json is there, in any state (even a corrupt one)."""
        return os.path.lexists(self._vault_file)

    def create(self, passphrase: str, *, kdf_n: int = DEFAULT_KDF_N) -> None:
        """Make a new vault key, wrapped with ``passphrase``.

        Refuses over any existing vault.json, and over identities left
        without one: they may be restorable, and a fresh key would orphan them.
        """
        if not _kdf_params_allowed(kdf_n, KDF_R, KDF_P):
            raise ValueError(f"kdf_n must be a power of two from {KDF_MIN_N} to {KDF_MAX_N}.")
        with self._write_errors():
            make_private_dirs(self.directory)
            os.chmod(self.directory, 0o700)
        with self._writing():
            if self.exists():
                raise VaultError(
                    f"a vault already exists at {self._vault_file}; it was left untouched."
                )
            if self.names():
                raise VaultError(
                    f"{self._identities} holds identities but there is no {VAULT_FILE}; "
                    "restore it, or move the identities away before creating a new vault."
                )
            make_private_dirs(self._identities)
            header = _wrap(X25519PrivateKey.generate(), passphrase, kdf_n, KDF_R, KDF_P)
            _write_atomic(self._vault_file, _dump(header.to_json()))

    def unlock_key(self, passphrase: str) -> VaultKey:
        """Unwrap the vault key: the one expensive step of unlocking."""
        return VaultKey(self._unwrap(self._read_header(), passphrase))

    def change_passphrase(self, old: str, new: str) -> None:
        """Rewrap the vault key; identities, sealed to its public half, stay as they are."""
        with self._writing():
            header = self._read_header()
            private = self._unwrap(header, old)
            rewrapped = _wrap(private, new, header.n, header.r, header.p)
            _write_atomic(self._vault_file, _dump(rewrapped.to_json()))

    def names(self) -> list[str]:
        """The identities in the vault, sorted; a corrupt one is still listed."""
        try:
            entries = os.listdir(self._identities)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise VaultError(f"cannot read {self._identities}: {_reason(e)}.") from None
        stems = (e[: -len(IDENTITY_SUFFIX)] for e in entries if e.endswith(IDENTITY_SUFFIX))
        return sorted(stem for stem in stems if _NAME_RE.fullmatch(stem))

    def read_metadata(self, name: str) -> dict[str, Any]:
        """The caller's metadata; needs no passphrase."""
        return self._read_identity(name)["metadata"]

    def store(
        self,
        name: str,
        metadata: dict[str, Any],
        private_key: PrivateKeyTypes,
        *,
        replace: bool = False,
        check: Callable[[], None] | None = None,
    ) -> None:
        """Seal ``private_key`` to the vault's public key and save it with ``metadata``.

        Only the public key is used, so this works while the agent is locked.
        ``check`` runs under the writer lock, before anything is written: a
        rule that reads other identities (no two bound to the same host) then
        holds against concurrent writers too.
        """
        path = self._identity_file(name)
        plaintext = _pkcs8(private_key)
        with self._writing():
            header = self._read_header()
            self._refuse_case_twin(name)
            if not replace and os.path.lexists(path):
                raise VaultError(f"an identity named {name!r} already exists ({path}).")
            if check is not None:
                check()
            sealed = _seal(plaintext, header.public_key, name)
            doc = {
                "format": IDENTITY_FORMAT,
                "version": VERSION,
                "metadata": metadata,
                "sealed_key": sealed,
            }
            make_private_dirs(self._identities)
            _write_atomic(path, _dump(doc))

    def update_metadata(
        self, name: str, metadata: dict[str, Any], *, check: Callable[[], None] | None = None
    ) -> None:
        """Replace the metadata and keep the sealed key; refuses a corrupt file.

        ``check`` runs under the writer lock, as in ``store``.
        """
        path = self._identity_file(name)
        with self._writing():
            doc = self._read_identity(name)
            if check is not None:
                check()
            doc["metadata"] = metadata
            _write_atomic(path, _dump(doc))

    def remove(self, name: str) -> None:
        """Delete an identity; one unlink, so it is gone whole or not at all."""
        path = self._identity_file(name)
        with self._writing():
            try:
                path.unlink()
            except FileNotFoundError:
                raise _unknown(name, path) from None
            _fsync_dir(self._identities)

    def open_key(self, name: str, key: VaultKey) -> PrivateKeyTypes:
        """Unseal an identity's private key with the unlocked vault key."""
        path = self._identity_file(name)
        sealed = _object(self._read_identity(name), "sealed_key", path)
        plaintext = _unseal(sealed, key, name, path)
        try:
            return serialization.load_der_private_key(plaintext, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            unusable = f"{path} holds a sealed key that is not a usable private key."
            raise VaultError(unusable) from None

    # --- reading ---

    def _read_header(self) -> _Header:
        missing = VaultError(
            f"there is no vault here: {self._vault_file} is missing; create one with"
            " 'agentctl init'."
        )
        return _Header.parse(_read_json(self._vault_file, missing), self._vault_file)

    def _unwrap(self, header: _Header, passphrase: str) -> X25519PrivateKey:
        aad = WRAP_AAD_PREFIX + header.public_key
        wrap_key = _derive(passphrase, header.salt, header.n, header.r, header.p)
        try:
            raw = AESGCM(wrap_key).decrypt(header.nonce, header.ct, aad)
        except InvalidTag:
            raise BadPassphrase() from None
        private = X25519PrivateKey.from_private_bytes(raw)
        if private.public_key().public_bytes_raw() != header.public_key:
            raise _corrupt(self._vault_file, "its public key does not match its private key")
        return private

    def _read_identity(self, name: str) -> dict[str, Any]:
        path = self._identity_file(name)
        doc = _read_json(path, _unknown(name, path))
        _check_format(doc, IDENTITY_FORMAT, path)
        _object(doc, "metadata", path)
        return doc

    def _refuse_case_twin(self, name: str) -> None:
        # On a case-insensitive file system (macOS) "Work" and "work" are the
        # same file, and the sealed key of one would not open as the other.
        twins = [n for n in self.names() if n != name and n.lower() == name.lower()]
        if twins:
            raise VaultError(
                f"an identity named {twins[0]!r} already exists; names that differ only "
                f"in case are refused, so {name!r} cannot be stored."
            )

    # --- writing ---

    @contextlib.contextmanager
    def _write_errors(self) -> Iterator[None]:
        """Turn the OS's refusals into one sentence about the vault folder."""
        try:
            yield
        except OSError as e:
            raise VaultError(
                f"cannot write to the vault folder {self.directory}: {_reason(e)}."
            ) from e

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the writer lock, clear a crash's debris, translate OS errors."""
        with self._write_errors(), self._locked():
            self._sweep()
            yield

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not self.directory.is_dir():
            raise VaultError(f"there is no vault at {self.directory}.")
        flags = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.directory / LOCK_FILE, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)
            self._wait_for_lock(fd)
            yield
        finally:
            os.close(fd)

    def _wait_for_lock(self, fd: int) -> None:
        # Polling rather than a blocking flock: a blocked flock cannot time out.
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise VaultBusy() from None
                time.sleep(LOCK_POLL_SECONDS)

    def _sweep(self) -> None:
        for folder in (self.directory, self._identities):
            for leftover in folder.glob(f"{TMP_PREFIX}*"):
                leftover.unlink(missing_ok=True)


# --- crypto ---


def _derive(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    secret = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(secret)


def _wrap(private: X25519PrivateKey, passphrase: str, n: int, r: int, p: int) -> _Header:
    public_key = private.public_key().public_bytes_raw()
    salt = os.urandom(SALT_BYTES)
    nonce = os.urandom(NONCE_BYTES)
    ct = AESGCM(_derive(passphrase, salt, n, r, p)).encrypt(
        nonce, private.private_bytes_raw(), WRAP_AAD_PREFIX + public_key
    )
    return _Header(public_key=public_key, salt=salt, n=n, r=r, p=p, nonce=nonce, ct=ct)


def _kdf_params_allowed(n: int, r: int, p: int) -> bool:
    power_of_two = n > 0 and n & (n - 1) == 0
    return (
        power_of_two
        and KDF_MIN_N <= n <= KDF_MAX_N
        and 1 <= r <= KDF_MAX_R
        and 1 <= p <= KDF_MAX_P
        and 128 * n * r <= KDF_MAX_MEMORY
    )


def _seal_key(shared: bytes, epk: bytes, vault_public: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=epk + vault_public, info=SEAL_HKDF_INFO)
    return hkdf.derive(shared)


def _seal(plaintext: bytes, vault_public: bytes, name: str) -> dict[str, Any]:
    ephemeral = X25519PrivateKey.generate()
    epk = ephemeral.public_key().public_bytes_raw()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(vault_public))
    nonce = os.urandom(NONCE_BYTES)
    ct = AESGCM(_seal_key(shared, epk, vault_public)).encrypt(
        nonce, plaintext, SEAL_AAD_PREFIX + name.encode("utf-8")
    )
    return {
        "format": SEALED_KEY_FORMAT,
        "version": VERSION,
        "alg": SEAL_ALG,
        "epk": _b64(epk),
        "nonce": _b64(nonce),
        "ct": _b64(ct),
    }


def _unseal(sealed: dict[str, Any], key: VaultKey, name: str, path: Path) -> bytes:
    _check_format(sealed, SEALED_KEY_FORMAT, path)
    if sealed.get("alg") != SEAL_ALG:
        raise _corrupt(path, f"its sealed key uses {sealed.get('alg')!r}, not {SEAL_ALG}")
    epk = _bytes(sealed, "epk", path, X25519_BYTES)
    nonce = _bytes(sealed, "nonce", path, NONCE_BYTES)
    ct = _bytes(sealed, "ct", path)
    try:
        shared = key.exchange(epk)
        aes_key = _seal_key(shared, epk, key.public_bytes)
        return AESGCM(aes_key).decrypt(nonce, ct, SEAL_AAD_PREFIX + name.encode("utf-8"))
    except (InvalidTag, ValueError):
        raise VaultError(
            f"{path} holds a sealed key that does not open with this vault key: "
            "it was altered, renamed or sealed to another vault."
        ) from None


def _pkcs8(private_key: PrivateKeyTypes) -> bytes:
    if not isinstance(private_key, PrivateKeyTypes):
        raise TypeError(f"expected a cryptography private key, got {type(private_key).__name__}")
    return private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# --- files and JSON ---


def _read_json(path: Path, missing: VaultError) -> dict[str, Any]:
    """Parse a vault file; ``missing`` says what its absence means to the caller."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise missing from None
    except OSError as e:
        raise VaultError(f"cannot read {path}: {_reason(e)}.") from None
    try:
        doc = json.loads(raw)
    except ValueError:
        raise _corrupt(path, "it is not valid JSON") from None
    if not isinstance(doc, dict):
        raise _corrupt(path, "it is not a JSON object")
    return doc


def _dump(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode("utf-8")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.parent / f"{TMP_PREFIX}{secrets.token_hex(8)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600)
    try:
        with open(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename or unlink durable: it lives in the folder, not the file."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_format(doc: dict[str, Any], expected: str, path: Path) -> None:
    if doc.get("format") != expected:
        raise VaultError(
            f"{path} is not an {expected} file (its format is {doc.get('format')!r}); "
            "it was left untouched."
        )
    version = doc.get("version")
    if type(version) is not int or version != VERSION:
        raise VaultError(
            f"{path} is version {version!r} of the {expected} format; this mtls-agent "
            f"reads version {VERSION} only. It was left untouched."
        )


def _object(doc: dict[str, Any], field: str, path: Path) -> dict[str, Any]:
    value = doc.get(field)
    if not isinstance(value, dict):
        raise _corrupt(path, f"its {field!r} is not a JSON object")
    return value


def _int(doc: dict[str, Any], field: str, path: Path) -> int:
    value = doc.get(field)
    if type(value) is not int:
        raise _corrupt(path, f"its {field!r} is not an integer")
    return value


def _bytes(doc: dict[str, Any], field: str, path: Path, length: int | None = None) -> bytes:
    bad = _corrupt(path, f"its {field!r} is not base64 of the right length")
    value = doc.get(field)
    if not isinstance(value, str):
        raise bad
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise bad from None
    if length is not None and len(raw) != length:
        raise bad
    return raw


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _corrupt(path: Path, why: str) -> VaultError:
    return VaultError(f"{path} is corrupt: {why}. It was left untouched.")


def _unknown(name: str, path: Path) -> VaultError:
    return VaultError(f"there is no identity named {name!r} (no file {path}).")


def _reason(e: OSError) -> str:
    """'permission denied' rather than '[Errno 13] Permission denied: ...'."""
    text = e.strerror or str(e)
    return text[:1].lower() + text[1:]
