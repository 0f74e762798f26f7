"""The broker's secrets at rest: its Ed25519 signing key and the weights keys it releases.

Nothing secret is on disk in the clear. In the broker's directory:

- ``broker-signing.key``: the signing key, PKCS#8 PEM encrypted under the passphrase
  (``EMBASSY_BROKER_PASSPHRASE``); ``broker-signing.pub``: its public key (PEM), the one
  embassies and auditors pin (releases, denials and the decision log are signed by it).
- ``keyring.json``: ``{"v":1,"type":"embassy-broker-keyring","kdf":{"name":"scrypt",
  "salt":"<b64>","n":N,"r":8,"p":1},"nonce":"<b64>","ciphertext":"<b64>"}``: AES-256-GCM
  under a key scrypt derives from the passphrase, over the canonical JSON ``{"keys":[
  {"model_id","key_id","key":"<hex>"}, ...]}``, with every other field as associated data
  (so the KDF parameters cannot be weakened without the ciphertext failing).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from embassy.daemon.atomic import create_private, ensure_private_dir, write_atomic
from embassy.errors import ConfigError, EmbassyError
from embassy.weights.release import KEY_LEN, check_id
from embassy.wire.codec import (
    b64decode,
    b64encode,
    canonical_json,
    field,
    hex_decode,
    only_fields,
    parse_json_object,
)

PASSPHRASE_ENV = "EMBASSY_BROKER_PASSPHRASE"  # noqa: S105 (the variable's name)
SIGNING_KEY_FILE = "broker-signing.key"
PUBLIC_KEY_FILE = "broker-signing.pub"
KEYRING_FILE = "keyring.json"
KEYRING_TYPE = "embassy-broker-keyring"
SCRYPT_N = 1 << 15
SCRYPT_R = 8
SCRYPT_P = 1
# Bounds on what a keyring file may ask of scrypt (a tampered file could ask for more).
_MAX_N = 1 << 20
MAX_KEYS = 10_000

Keys = Mapping[tuple[str, str], bytes]


def passphrase_from_env() -> bytes:
    value = os.environ.get(PASSPHRASE_ENV, "")
    if not value:
        raise ConfigError(f"set {PASSPHRASE_ENV}: the broker's keys are stored encrypted under it")
    return value.encode("utf-8")


def _create_private(path: Path, data: bytes) -> None:
    try:
        create_private(path, data)
    except FileExistsError:
        raise ConfigError(f"{path}: exists; refusing to overwrite a broker key") from None


def init_broker(directory: Path, passphrase: bytes) -> Ed25519PublicKey:
    """A new signing key and an empty keyring in ``directory``; never replaces either."""
    if not passphrase:
        raise ConfigError("the broker's keys need a passphrase (they are never stored clear)")
    ensure_private_dir(directory)
    if (directory / KEYRING_FILE).exists():
        raise ConfigError(f"{directory / KEYRING_FILE}: exists; refusing to replace a keyring")
    key = Ed25519PrivateKey.generate()
    _create_private(
        directory / SIGNING_KEY_FILE,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        ),
    )
    public = key.public_key()
    write_atomic(
        directory / PUBLIC_KEY_FILE,
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        mode=0o644,
    )
    _create_private(directory / KEYRING_FILE, seal_keyring({}, passphrase))
    return public


def load_signing_key(directory: Path, passphrase: bytes) -> Ed25519PrivateKey:
    path = directory / SIGNING_KEY_FILE
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{path}: {exc.strerror}; create the broker with `embassy broker init`"
        ) from None
    try:
        key = serialization.load_pem_private_key(pem, passphrase)
    except (ValueError, TypeError):
        raise ConfigError(f"{path}: cannot be decrypted (wrong passphrase, or not a key)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 key")
    if load_public_key(directory) != key.public_key():
        raise ConfigError(f"{directory / PUBLIC_KEY_FILE}: not the signing key's public key")
    return key


def load_public_key(directory: Path) -> Ed25519PublicKey:
    path = directory / PUBLIC_KEY_FILE
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"{path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: not an Ed25519 public key")
    return key


def _kdf(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)


def seal_keyring(keys: Keys, passphrase: bytes, *, n: int = SCRYPT_N) -> bytes:
    """The keyring file's bytes for ``keys`` under ``passphrase`` (fresh salt and nonce)."""
    salt, nonce = os.urandom(16), os.urandom(12)
    header = {
        "v": 1,
        "type": KEYRING_TYPE,
        "kdf": {"name": "scrypt", "salt": b64encode(salt), "n": n, "r": SCRYPT_R, "p": SCRYPT_P},
        "nonce": b64encode(nonce),
    }
    plain = canonical_json(
        {
            "keys": [
                {"model_id": m, "key_id": k, "key": key.hex()}
                for (m, k), key in sorted(keys.items())
            ]
        }
    )
    ciphertext = AESGCM(_kdf(passphrase, salt, n, SCRYPT_R, SCRYPT_P)).encrypt(
        nonce, plain, canonical_json(header)
    )
    return canonical_json({**header, "ciphertext": b64encode(ciphertext)})


def open_keyring(
    data: bytes, passphrase: bytes, what: str = KEYRING_FILE
) -> dict[tuple[str, str], bytes]:
    """The weights keys in a keyring file; ``ConfigError`` if the passphrase is wrong or the
    file was changed, ``WireFormatError`` if it does not parse."""
    obj = parse_json_object(data, what, integers_only=True)
    only_fields(obj, {"v", "type", "kdf", "nonce", "ciphertext"}, what)
    if obj.get("v") != 1 or obj.get("type") != KEYRING_TYPE:
        raise ConfigError(f"{what}: expected v 1 and type {KEYRING_TYPE!r}")
    kdf = field(obj, "kdf", dict, what)
    only_fields(kdf, {"name", "salt", "n", "r", "p"}, f"{what}.kdf")
    n, r, p = (field(kdf, k, int, f"{what}.kdf") for k in ("n", "r", "p"))
    if (
        kdf.get("name") != "scrypt"
        or not (1 << 14 <= n <= _MAX_N)
        or n & (n - 1)
        or r != 8
        or not 1 <= p <= 4
    ):
        raise ConfigError(f"{what}.kdf: unsupported parameters (scrypt, n 2^14..2^20, r 8)")
    salt = b64decode(kdf.get("salt"), f"{what}.kdf.salt")
    nonce = b64decode(obj.get("nonce"), f"{what}.nonce")
    ciphertext = b64decode(obj.get("ciphertext"), f"{what}.ciphertext")
    if len(nonce) != 12 or len(salt) < 16:
        raise ConfigError(f"{what}: nonce or salt of the wrong size")
    header = {k: v for k, v in obj.items() if k != "ciphertext"}
    try:
        plain = AESGCM(_kdf(passphrase, salt, n, r, p)).decrypt(
            nonce, ciphertext, canonical_json(header)
        )
    except InvalidTag:
        raise ConfigError(
            f"{what}: cannot be decrypted (wrong passphrase, or the file was changed)"
        ) from None
    entries = field(parse_json_object(plain, what), "keys", list, what)
    keys: dict[tuple[str, str], bytes] = {}
    for i, entry in enumerate(entries):
        where = f"{what}.keys[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected an object")
        pair = (
            check_id(entry.get("model_id"), f"{where}.model_id"),
            check_id(entry.get("key_id"), f"{where}.key_id"),
        )
        keys[pair] = hex_decode(entry.get("key"), f"{where}.key", size=KEY_LEN)
    return keys


def load_keyring(directory: Path, passphrase: bytes) -> dict[tuple[str, str], bytes]:
    path = directory / KEYRING_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{path}: {exc.strerror}; create the broker with `embassy broker init`"
        ) from None
    return open_keyring(data, passphrase, str(path))


def read_weights_key(path: Path) -> bytes:
    """A weights key file: 32 raw bytes, or 64 hex characters (surrounding space allowed)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    if len(data) == KEY_LEN:
        return data
    text = data.strip()
    if len(text) == 2 * KEY_LEN:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise ConfigError(
        f"{path}: expected a {KEY_LEN}-byte key, raw or as {2 * KEY_LEN} hex characters"
    )


def add_key(directory: Path, passphrase: bytes, model_id: str, key_id: str, key: bytes) -> int:
    """Add one weights key; refuses to replace an existing (model_id, key_id). Returns the
    number of keys now in the keyring."""
    try:
        check_id(model_id, "model_id")
        check_id(key_id, "key_id")
    except EmbassyError as exc:
        raise ConfigError(exc.message) from None
    if len(key) != KEY_LEN:
        raise ConfigError(f"a weights key is {KEY_LEN} bytes")
    keys = load_keyring(directory, passphrase)
    if (model_id, key_id) in keys:
        raise ConfigError(f"model {model_id!r} already has a key {key_id!r}; use a new key id")
    if len(keys) >= MAX_KEYS:
        raise ConfigError(f"the keyring holds {MAX_KEYS} keys already")
    keys[(model_id, key_id)] = key
    write_atomic(directory / KEYRING_FILE, seal_keyring(keys, passphrase))
    return len(keys)
