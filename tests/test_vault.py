"""The vault: identities at rest, sealed to a passphrase-wrapped X25519 key."""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from support.tools import locked_by_another_process, require_tool

import agent.vault
from agent.errors import BadPassphrase, VaultBusy, VaultError
from agent.vault import Vault, VaultKey, check_name

REPO = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / "data" / "vault-v1"
PASSPHRASE = "correct horse battery staple"
FAST_N = 2**10
META = {"hosts": ["api.example.com"], "chain": ["-----BEGIN CERTIFICATE-----..."]}

# The identity "work" of tests/data/vault-v1, sealed there once with the v1
# code. If this stops opening, old vaults in the field stop opening too.
FIXTURE_KEY_PEM = b"""-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg1YNiRZYrgY+EpfSx
yAYHeH/nyfUk1P4ZEgCPnPI4gt+hRANCAARjMwm3hJB9wNGb9LjJsFrt28EO1FYR
ET+Ac1Ea3FgR5J0yQLOSjsUBm84+uWSkxivKwFMBACmz1vRspQ2xr3n2
-----END PRIVATE KEY-----
"""
FIXTURE_METADATA = {"hosts": ["api.example.com"], "note": "fixed test vector, format v1"}

KEY_FACTORIES: dict[str, Callable[[], object]] = {
    "ec-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "rsa-2048": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}


def _der(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def tmp() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp())
    yield folder
    for p in [folder, *folder.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o700)
    shutil.rmtree(folder)


@pytest.fixture
def vault(tmp: Path) -> Vault:
    v = Vault(tmp / "vault")
    v.create(PASSPHRASE, kdf_n=FAST_N)
    return v


@pytest.fixture
def fixture_vault(tmp: Path) -> Vault:
    shutil.copytree(FIXTURE, tmp / "vault")
    return Vault(tmp / "vault")


# --- round trips ---


@pytest.mark.parametrize("kind", sorted(KEY_FACTORIES))
def test_a_stored_key_opens_as_the_same_key(vault: Vault, kind: str) -> None:
    key = KEY_FACTORIES[kind]()
    vault.store("work", META, key)

    opened = vault.open_key("work", vault.unlock_key(PASSPHRASE))

    assert _der(opened) == _der(key)
    assert vault.read_metadata("work") == META


def test_store_never_needs_the_passphrase(vault: Vault, monkeypatch) -> None:
    def no_kdf(*args, **kwargs):
        raise AssertionError("store ran the KDF")

    key = ec.generate_private_key(ec.SECP256R1())
    with monkeypatch.context() as m:
        m.setattr(agent.vault, "Scrypt", no_kdf)
        Vault(vault.directory).store("work", META, key)
        assert Vault(vault.directory).read_metadata("work") == META

    assert _der(vault.open_key("work", vault.unlock_key(PASSPHRASE))) == _der(key)


def test_default_kdf_is_owasp_scrypt_within_32_mib_and_round_trips(tmp: Path) -> None:
    v = Vault(tmp / "vault")
    v.create(PASSPHRASE)

    kdf = json.loads((tmp / "vault" / "vault.json").read_text())["kdf"]
    assert (kdf["n"], kdf["r"], kdf["p"]) == (2**15, 8, 3)
    assert 128 * kdf["n"] * kdf["r"] <= 32 * 2**20  # scrypt's memory: 128·N·r bytes
    assert isinstance(v.unlock_key(PASSPHRASE), VaultKey)


def test_passphrase_is_the_same_however_unicode_composes_it(tmp: Path) -> None:
    v = Vault(tmp / "vault")
    v.create(unicodedata.normalize("NFD", "café crème"), kdf_n=FAST_N)

    assert isinstance(v.unlock_key(unicodedata.normalize("NFC", "café crème")), VaultKey)


def test_wrong_passphrase_raises_bad_passphrase_and_changes_no_file(vault: Vault) -> None:
    vault.store("work", META, ec.generate_private_key(ec.SECP256R1()))
    before = _snapshot(vault.directory)

    with pytest.raises(BadPassphrase):
        vault.unlock_key("wrong horse")
    with pytest.raises(BadPassphrase):
        vault.change_passphrase("wrong horse", "new")

    assert _snapshot(vault.directory) == before


def test_change_passphrase_retires_the_old_one_and_keeps_identities(vault: Vault) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    vault.store("work", META, key)
    identity_before = (vault.directory / "identities" / "work.json").read_bytes()

    vault.change_passphrase(PASSPHRASE, "new passphrase")

    with pytest.raises(BadPassphrase):
        vault.unlock_key(PASSPHRASE)
    assert _der(vault.open_key("work", vault.unlock_key("new passphrase"))) == _der(key)
    assert (vault.directory / "identities" / "work.json").read_bytes() == identity_before


# --- fixed vectors: today's code must open yesterday's vault ---


def test_vault_v1_fixture_still_opens(fixture_vault: Vault) -> None:
    expected = serialization.load_pem_private_key(FIXTURE_KEY_PEM, password=None)

    key = fixture_vault.unlock_key(PASSPHRASE)

    assert fixture_vault.names() == ["work"]
    assert fixture_vault.read_metadata("work") == FIXTURE_METADATA
    assert _der(fixture_vault.open_key("work", key)) == _der(expected)


def test_vault_v1_fixture_decrypts_by_the_documented_recipe() -> None:
    """Decrypt the fixture with primitives alone, by agent/vault.py's docstring."""
    header = json.loads((FIXTURE / "vault.json").read_text())
    sealed = json.loads((FIXTURE / "identities" / "work.json").read_text())["sealed_key"]
    b64 = base64.b64decode
    kdf, wrap, public = header["kdf"], header["wrap"], b64(header["public_key"])

    wrap_key = Scrypt(salt=b64(kdf["salt"]), length=32, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(
        PASSPHRASE.encode()
    )
    raw_private = AESGCM(wrap_key).decrypt(
        b64(wrap["nonce"]), b64(wrap["ct"]), b"mtls-agent-vault/1" + public
    )
    vault_private = X25519PrivateKey.from_private_bytes(raw_private)
    epk = b64(sealed["epk"])
    shared = vault_private.exchange(X25519PublicKey.from_public_bytes(epk))
    aes_key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=epk + public, info=b"mtls-agent sealed key v1"
    ).derive(shared)
    pkcs8 = AESGCM(aes_key).decrypt(
        b64(sealed["nonce"]), b64(sealed["ct"]), b"mtls-agent/identity/work"
    )

    assert vault_private.public_key().public_bytes_raw() == public
    expected = serialization.load_pem_private_key(FIXTURE_KEY_PEM, password=None)
    assert pkcs8 == _der(expected)


def test_a_fixture_vault_accepts_new_identities(fixture_vault: Vault) -> None:
    key = ed25519.Ed25519PrivateKey.generate()

    fixture_vault.store("new", META, key)

    assert _der(fixture_vault.open_key("new", fixture_vault.unlock_key(PASSPHRASE))) == _der(key)


# --- tampering, corruption, foreign files ---


def test_a_flipped_byte_in_a_sealed_key_is_refused_naming_the_file(vault: Vault) -> None:
    vault.store("work", META, ec.generate_private_key(ec.SECP256R1()))
    path = vault.directory / "identities" / "work.json"
    doc = json.loads(path.read_text())
    ct = bytearray(base64.b64decode(doc["sealed_key"]["ct"]))
    ct[10] ^= 0x01
    doc["sealed_key"]["ct"] = base64.b64encode(bytes(ct)).decode()
    path.write_text(json.dumps(doc))

    with pytest.raises(VaultError, match=re.escape(str(path))):
        vault.open_key("work", vault.unlock_key(PASSPHRASE))


def test_an_identity_copied_under_another_name_does_not_open(vault: Vault) -> None:
    vault.store("work", META, ec.generate_private_key(ec.SECP256R1()))
    identities = vault.directory / "identities"
    shutil.copy(identities / "work.json", identities / "other.json")

    with pytest.raises(VaultError, match=re.escape(str(identities / "other.json"))):
        vault.open_key("other", vault.unlock_key(PASSPHRASE))


def test_a_key_sealed_to_another_vault_does_not_open(vault: Vault, tmp: Path) -> None:
    elsewhere = Vault(tmp / "elsewhere")
    elsewhere.create(PASSPHRASE, kdf_n=FAST_N)
    elsewhere.store("work", META, ec.generate_private_key(ec.SECP256R1()))
    shutil.copy(elsewhere.directory / "identities" / "work.json", vault.directory / "identities")

    with pytest.raises(VaultError, match=re.escape("work.json")):
        vault.open_key("work", vault.unlock_key(PASSPHRASE))


def test_a_swapped_vault_public_key_fails_the_unwrap(vault: Vault) -> None:
    path = vault.directory / "vault.json"
    doc = json.loads(path.read_text())
    other = X25519PrivateKey.generate().public_key().public_bytes_raw()
    doc["public_key"] = base64.b64encode(other).decode()
    path.write_text(json.dumps(doc))

    with pytest.raises(VaultError):
        vault.unlock_key(PASSPHRASE)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"format": "mtls-agent-vault", "version": 1}'],
    ids=["bad-json", "not-utf8", "not-an-object", "fields-missing"],
)
def test_a_corrupt_vault_json_is_refused_naming_it(vault: Vault, content: bytes) -> None:
    path = vault.directory / "vault.json"
    path.write_bytes(content)

    with pytest.raises(VaultError, match=re.escape(str(path))):
        vault.unlock_key(PASSPHRASE)
    with pytest.raises(VaultError, match=re.escape(str(path))):
        vault.store("work", META, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(VaultError, match="already exists"):
        vault.create(PASSPHRASE, kdf_n=FAST_N)
    assert path.read_bytes() == content


@pytest.mark.parametrize(
    ("field", "value"),
    [("format", "age-encryption.org"), ("version", 2), ("version", True), ("version", "1")],
)
def test_a_foreign_vault_json_is_refused_and_left_untouched(
    vault: Vault, field: str, value: object
) -> None:
    path = vault.directory / "vault.json"
    doc = json.loads(path.read_text())
    doc[field] = value
    path.write_text(json.dumps(doc))
    before = _snapshot(vault.directory)

    with pytest.raises(VaultError, match=re.escape(str(path))):
        vault.unlock_key(PASSPHRASE)
    with pytest.raises(VaultError, match=re.escape(str(path))):
        vault.change_passphrase(PASSPHRASE, "new")
    assert _snapshot(vault.directory) == before


@pytest.mark.parametrize(
    "kdf",
    [{"n": 2**30}, {"n": 1000}, {"n": 2**4}, {"r": 1000}, {"p": 100}, {"n": 2**20, "r": 16}],
    ids=["n-huge", "n-not-power-of-two", "n-tiny", "r-huge", "p-huge", "memory-over-1GiB"],
)
def test_absurd_kdf_parameters_are_refused_before_deriving(
    vault: Vault, monkeypatch, kdf: dict
) -> None:
    path = vault.directory / "vault.json"
    doc = json.loads(path.read_text())
    doc["kdf"].update(kdf)
    path.write_text(json.dumps(doc))

    def no_kdf(*args, **kwargs):
        raise AssertionError("the KDF ran with absurd parameters")

    monkeypatch.setattr(agent.vault, "Scrypt", no_kdf)
    with pytest.raises(VaultError, match=re.escape(str(path))):
        vault.unlock_key(PASSPHRASE)


def test_create_refuses_an_absurd_kdf_cost(tmp: Path) -> None:
    with pytest.raises(ValueError):
        Vault(tmp / "vault").create(PASSPHRASE, kdf_n=3)
    assert not (tmp / "vault").exists()


def test_a_corrupt_identity_is_named_and_never_overwritten_silently(vault: Vault) -> None:
    path = vault.directory / "identities" / "work.json"
    vault.store("work", META, ec.generate_private_key(ec.SECP256R1()))
    path.write_bytes(b'{"format": "something-else"}')

    with pytest.raises(VaultError, match=re.escape(str(path))):
        vault.read_metadata("work")
    with pytest.raises(VaultError, match=re.escape(str(path))):
        vault.update_metadata("work", {"hosts": []})
    with pytest.raises(VaultError, match="already exists"):
        vault.store("work", META, ec.generate_private_key(ec.SECP256R1()))
    assert path.read_bytes() == b'{"format": "something-else"}'
    assert vault.names() == ["work"]


# --- create, store, update, remove ---


def test_create_refuses_over_an_existing_vault(vault: Vault) -> None:
    before = _snapshot(vault.directory)

    with pytest.raises(VaultError, match="already exists"):
        vault.create("another passphrase", kdf_n=FAST_N)

    assert _snapshot(vault.directory) == before
    assert isinstance(vault.unlock_key(PASSPHRASE), VaultKey)


def test_create_refuses_over_identities_whose_vault_json_is_gone(vault: Vault) -> None:
    vault.store("work", META, ec.generate_private_key(ec.SECP256R1()))
    (vault.directory / "vault.json").unlink()

    assert not vault.exists()
    with pytest.raises(VaultError, match="restore it"):
        vault.create(PASSPHRASE, kdf_n=FAST_N)
    assert not vault.exists()


def test_writers_on_a_missing_vault_say_so(tmp: Path) -> None:
    missing = Vault(tmp / "nowhere")

    assert not missing.exists()
    assert missing.names() == []
    with pytest.raises(VaultError, match="no vault"):
        missing.store("work", META, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(VaultError, match="no vault"):
        missing.unlock_key(PASSPHRASE)
    assert not (tmp / "nowhere").exists()


def test_store_refuses_an_existing_name_unless_told_to_replace(vault: Vault) -> None:
    old, new = ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()
    vault.store("work", META, old)

    with pytest.raises(VaultError, match="already exists"):
        vault.store("work", {"hosts": []}, new)
    vault.store("work", {"hosts": ["new.example.com"]}, new, replace=True)

    assert vault.read_metadata("work") == {"hosts": ["new.example.com"]}
    assert _der(vault.open_key("work", vault.unlock_key(PASSPHRASE))) == _der(new)


def test_names_differing_only_in_case_are_refused(vault: Vault) -> None:
    vault.store("Work", META, ec.generate_private_key(ec.SECP256R1()))

    with pytest.raises(VaultError, match="case"):
        vault.store("work", META, ec.generate_private_key(ec.SECP256R1()), replace=True)
    assert vault.names() == ["Work"]


def test_update_metadata_keeps_the_sealed_key(vault: Vault) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    vault.store("work", META, key)

    vault.update_metadata("work", {"hosts": ["other.example.com"], "pins": []})

    assert vault.read_metadata("work") == {"hosts": ["other.example.com"], "pins": []}
    assert _der(vault.open_key("work", vault.unlock_key(PASSPHRASE))) == _der(key)
    with pytest.raises(VaultError, match="no identity named 'ghost'"):
        vault.update_metadata("ghost", META)


def test_remove_deletes_the_identity_and_refuses_unknown_names(vault: Vault) -> None:
    vault.store("work", META, ec.generate_private_key(ec.SECP256R1()))
    vault.store("home", META, ec.generate_private_key(ec.SECP256R1()))

    vault.remove("work")

    assert vault.names() == ["home"]
    with pytest.raises(VaultError, match=re.escape("work.json")):
        vault.read_metadata("work")
    with pytest.raises(VaultError, match="no identity named 'work'"):
        vault.remove("work")


def test_names_are_sorted_and_ignore_what_is_not_an_identity(vault: Vault) -> None:
    for name in ("zeta", "Alpha", "mid.dle"):
        vault.store(name, META, ed25519.Ed25519PrivateKey.generate())
    identities = vault.directory / "identities"
    for stray in (".tmp-1234", ".hidden.json", "notes.txt", "-dash.json"):
        (identities / stray).write_text("{}")

    assert vault.names() == ["Alpha", "mid.dle", "zeta"]


def test_metadata_must_be_json(vault: Vault) -> None:
    with pytest.raises((TypeError, ValueError)):
        vault.store("work", {"when": object()}, ec.generate_private_key(ec.SECP256R1()))
    assert vault.names() == []
    assert list((vault.directory / "identities").iterdir()) == []


def test_store_takes_only_private_key_objects(vault: Vault) -> None:
    with pytest.raises(TypeError):
        vault.store("work", META, b"-----BEGIN PRIVATE KEY-----")


# --- atomicity, locking, leftovers ---


def test_leftover_temporary_files_are_swept_by_the_next_writer(vault: Vault) -> None:
    leftovers = [vault.directory / ".tmp-dead1", vault.directory / "identities" / ".tmp-dead2"]
    for path in leftovers:
        path.write_bytes(b"half a write")

    vault.store("work", META, ec.generate_private_key(ec.SECP256R1()))

    assert not any(path.exists() for path in leftovers)
    assert sorted(p.name for p in vault.directory.iterdir()) == [
        ".lock",
        "identities",
        "vault.json",
    ]


def test_a_crash_mid_replace_leaves_the_old_identity_whole(vault: Vault) -> None:
    old = ec.generate_private_key(ec.SECP256R1())
    vault.store("work", META, old)
    crash = textwrap.dedent(
        """
        import os, sys
        from pathlib import Path
        from cryptography.hazmat.primitives.asymmetric import ec
        from agent.vault import Vault
        os.replace = lambda *args: os._exit(9)  # the power goes out just before the rename
        key = ec.generate_private_key(ec.SECP256R1())
        Vault(Path(sys.argv[1])).store("work", {"hosts": ["new"]}, key, replace=True)
        """
    )
    done = subprocess.run([sys.executable, "-c", crash, str(vault.directory)], cwd=REPO)
    assert done.returncode == 9
    identities = vault.directory / "identities"
    assert [p.name for p in identities.glob(".tmp-*")] != []

    assert vault.read_metadata("work") == META
    assert _der(vault.open_key("work", vault.unlock_key(PASSPHRASE))) == _der(old)
    vault.update_metadata("work", META)
    assert list(identities.glob(".tmp-*")) == []


def test_a_writer_gives_up_with_vault_busy_while_another_holds_the_lock(tmp: Path) -> None:
    v = Vault(tmp / "vault", lock_timeout=0.3)
    v.create(PASSPHRASE, kdf_n=FAST_N)
    with locked_by_another_process(v.directory / ".lock"):
        started = time.monotonic()
        with pytest.raises(VaultBusy, match="vault busy"):
            v.store("work", META, ec.generate_private_key(ec.SECP256R1()))
        waited = time.monotonic() - started

    assert 0.3 <= waited < 3
    assert v.names() == []
    v.store("work", META, ec.generate_private_key(ec.SECP256R1()))
    assert v.names() == ["work"]


_WRITE_ATTEMPTS = """
import json, sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric import ec
from agent.errors import VaultError
from agent.vault import Vault

vault, passphrase = Vault(Path(sys.argv[1])), sys.argv[2]
attempts = (
    lambda: vault.store("new", {}, ec.generate_private_key(ec.SECP256R1())),
    lambda: vault.update_metadata("work", {}),
    lambda: vault.remove("work"),
    lambda: vault.change_passphrase(passphrase, "new"),
)
refusals = []
for attempt in attempts:
    try:
        attempt()
    except VaultError as exc:
        refusals.append(str(exc))
    else:
        refusals.append(None)
print(json.dumps(refusals))
"""


def test_a_read_only_vault_folder_fails_clearly_and_loses_nothing(vault: Vault) -> None:
    """The writes run in a child; as root it loses the capabilities that let root
    write through a 0500 folder (setpriv), so the kernel refuses as for any user."""
    key = ec.generate_private_key(ec.SECP256R1())
    vault.store("work", META, key)
    prefix: list[str] = []
    if os.geteuid() == 0:
        prefix = [require_tool("setpriv"), "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    for folder in (vault.directory / "identities", vault.directory):
        folder.chmod(0o500)
    before = _snapshot(vault.directory)
    refusal = f"cannot write to the vault folder {vault.directory}: permission denied."

    child = subprocess.run(
        [*prefix, sys.executable, "-c", _WRITE_ATTEMPTS, str(vault.directory), PASSPHRASE],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip

    assert json.loads(child.stdout) == [refusal] * 4, child.stderr
    assert _snapshot(vault.directory) == before
    assert _der(vault.open_key("work", vault.unlock_key(PASSPHRASE))) == _der(key)


def test_a_refused_write_is_one_sentence_and_loses_nothing(vault: Vault, monkeypatch) -> None:
    """Runs as root too, where the read-only folder test cannot."""
    key = ec.generate_private_key(ec.SECP256R1())
    vault.store("work", META, key)
    before = _snapshot(vault.directory)

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", disk_full)
        with pytest.raises(VaultError) as refused:
            vault.store("work", {}, ed25519.Ed25519PrivateKey.generate(), replace=True)

    assert str(refused.value) == (
        f"cannot write to the vault folder {vault.directory}: no space left on device."
    )
    assert _snapshot(vault.directory) == before
    assert _der(vault.open_key("work", vault.unlock_key(PASSPHRASE))) == _der(key)


def test_files_are_0600_and_folders_0700_whatever_the_umask(tmp: Path) -> None:
    old_umask = os.umask(0)
    try:
        v = Vault(tmp / "parent" / "vault")
        v.create(PASSPHRASE, kdf_n=FAST_N)
        v.store("work", META, ec.generate_private_key(ec.SECP256R1()))
        v.update_metadata("work", {"hosts": []})
        v.change_passphrase(PASSPHRASE, "new")
    finally:
        os.umask(old_umask)

    for folder in (tmp / "parent", v.directory, v.directory / "identities"):
        assert _mode(folder) == 0o700, folder
    for path in (v.directory / "vault.json", v.directory / ".lock"):
        assert _mode(path) == 0o600, path
    assert _mode(v.directory / "identities" / "work.json") == 0o600


# --- names and the key object ---


@pytest.mark.parametrize(
    "name",
    ["", "../x", "a/b", ".hidden", "-rf", "x" * 65, "a b", "ключ", "a\n", "..", ".", "a\\b"],
)
def test_check_name_rejects_unsafe_names(name: str) -> None:
    with pytest.raises(VaultError, match="not a valid identity name"):
        check_name(name)


@pytest.mark.parametrize("name", ["work", "Work_2", "api.example.com", "a-b", "_x", "x" * 64])
def test_check_name_accepts_ordinary_names(name: str) -> None:
    assert check_name(name) == name


def test_every_entry_point_checks_the_name(vault: Vault) -> None:
    key = vault.unlock_key(PASSPHRASE)
    for call in (
        lambda: vault.store("../escape", META, ec.generate_private_key(ec.SECP256R1())),
        lambda: vault.read_metadata("../vault"),
        lambda: vault.update_metadata("../vault", META),
        lambda: vault.remove("../vault"),
        lambda: vault.open_key("../vault", key),
    ):
        with pytest.raises(VaultError, match="not a valid identity name"):
            call()
    assert (vault.directory / "vault.json").exists()


def test_a_vault_key_never_shows_or_pickles_its_secret(vault: Vault) -> None:
    key = vault.unlock_key(PASSPHRASE)
    private = key._private.private_bytes_raw()

    shown = repr(key) + str(key)
    for spelling in (private.hex(), base64.b64encode(private).decode(), repr(private)):
        assert spelling not in shown
    with pytest.raises(TypeError):
        pickle.dumps(key)
