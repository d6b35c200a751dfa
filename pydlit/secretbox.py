"""Credentials sealed with AES-256-GCM, so the job database never holds them in the clear.

The key comes from PYDLIT_SECRET_KEY or, failing that, from `<db>.key` beside the database,
created on first start. Whoever can read the key can read the credentials: keep the key file
0600 and, where the database is backed up or shipped elsewhere, leave the key behind.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import stat
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16
_PREFIX = "v1:"
# Binds every ciphertext to its format version, so a future v2 text relabelled as v1 fails to open.
_AAD = b"pydlit-secretbox-v1"
_HKDF_INFO = b"pydlit PYDLIT_SECRET_KEY v1"


class SecretError(Exception):
    """A secret could not be sealed, opened or keyed; never carries a plaintext or a key."""


class SecretBox:
    """Seals JSON-serialisable values into opaque text and opens them again."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise SecretError(f"a secret key must be {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)

    def seal(self, obj: Any) -> str:
        """'v1:' + urlsafe base64 of a fresh random nonce and the ciphertext of obj as JSON."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        data = json.dumps(obj, separators=(",", ":")).encode()
        return _PREFIX + base64.urlsafe_b64encode(nonce + self._aead.encrypt(nonce, data, _AAD)).decode()

    def open(self, text: str) -> Any:
        """The value sealed into text; SecretError if the key is not the one it was sealed with
        or the text is damaged."""
        if not isinstance(text, str) or not text.startswith(_PREFIX):
            raise SecretError("not a sealed secret: it does not start with 'v1:'")
        try:
            raw = base64.urlsafe_b64decode(text[len(_PREFIX):].encode())
        except (binascii.Error, ValueError):
            raise SecretError("a sealed secret is corrupt: it is not valid base64") from None
        if len(raw) < _NONCE_BYTES + _TAG_BYTES:
            raise SecretError("a sealed secret is corrupt: it is too short")
        try:
            data = self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _AAD)
        except InvalidTag:
            # GCM cannot tell a wrong key from altered bytes, so the message names both.
            raise SecretError(
                "a sealed secret cannot be opened: it was sealed with another key (was"
                " PYDLIT_SECRET_KEY or the .key file beside the database changed?) or it is corrupt"
            ) from None
        return json.loads(data)


def load_key(db_path: str, env_key: str | None, create: bool = True) -> bytes:
    """The 32-byte key: from env_key (PYDLIT_SECRET_KEY) when set, else from `<db_path>.key`.

    env_key is used as is when it is the urlsafe base64 of 32 bytes (padded or not, as from
    `python -c 'import secrets; print(secrets.token_urlsafe(32))'`). Any other text is taken as
    a passphrase and stretched with HKDF-SHA256 (no salt, fixed info); HKDF is not a password
    hash, so such a passphrase must itself be long and random.

    Without env_key the key file is created on first start (32 random bytes, urlsafe base64,
    mode 0600) and read on later starts; a key file that group or others may access is refused.
    `create=False` (the database holds credentials sealed with the key) refuses to make a new
    one: it could not open them, and every job that brought credentials would fail.
    """
    if env_key and env_key.strip():
        text = env_key.strip()
        return _decode_key(text) or HKDF(
            algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=_HKDF_INFO
        ).derive(text.encode())
    if db_path in ("", ":memory:"):
        raise SecretError(
            f"the job database {db_path or '(temporary)'!r} is not a file, so there is nowhere to keep"
            " the secret key beside it: set PYDLIT_SECRET_KEY"
        )
    path = db_path + ".key"
    try:
        return _read_key_file(path)
    except FileNotFoundError:
        if not create:
            raise SecretError(
                f"the secret key file {path} is missing, and the job database holds credentials sealed"
                " with a key: put the file back, or set PYDLIT_SECRET_KEY to the key they were sealed"
                f" with. If that key is lost for good, delete them (sqlite3 {db_path} 'DELETE FROM"
                " job_secrets') and start again: the jobs that brought them then fail, asking to be"
                " submitted again"
            ) from None
    return _create_key_file(path)


def _decode_key(text: str) -> bytes | None:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    # urlsafe_b64decode skips characters outside its alphabet, so check the text round-trips.
    if len(raw) != KEY_BYTES or base64.urlsafe_b64encode(raw).decode().rstrip("=") != text.rstrip("="):
        return None
    return raw


def _read_key_file(path: str) -> bytes:
    # Mode and content are read through one descriptor, so the file checked is the file read.
    fd = os.open(path, os.O_RDONLY)
    with os.fdopen(fd, "r", encoding="ascii", errors="replace") as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        if mode & 0o077:
            raise SecretError(
                f"the secret key file {path} has mode {mode:04o}, so group or others may read it;"
                f" refusing to use it: run `chmod 600 {path}`"
            )
        key = _decode_key(f.read().strip())
    if key is None:
        raise SecretError(f"the secret key file {path} does not hold a urlsafe base64 {KEY_BYTES}-byte key")
    return key


def _create_key_file(path: str) -> bytes:
    key = secrets.token_bytes(KEY_BYTES)
    directory = os.path.dirname(os.path.abspath(path))
    # Written in full under a private name, then linked into place: a node starting at the same
    # time on the same database either wins the link or reads a complete key, never half of one.
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise SecretError(
            f"cannot create the secret key file {path}: {exc.strerror}; make {directory} writable"
            " or set PYDLIT_SECRET_KEY"
        ) from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(base64.urlsafe_b64encode(key).decode() + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read_key_file(path)
        except OSError as exc:
            raise SecretError(
                f"cannot create the secret key file {path}: {exc.strerror}; set PYDLIT_SECRET_KEY"
            ) from None
    finally:
        os.unlink(tmp)
    # Losing the key after a crash would lose every sealed credential: make its name durable too.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return key
