"""Credentials sealed at rest: AES-256-GCM round trips, failures, and where the key comes from."""
from __future__ import annotations

import base64
import os
import secrets
import stat
from pathlib import Path

import pytest

from pydlit.secretbox import SecretBox, SecretError, load_key

SECRETS = {
    "source": {"basicauth": {"user": "ci-bot", "password": "s3cr3t-PASSWORD"}},
    "targets": [None, {"header": {"X-Token": "hdr-SECRET"}}],
}


def box() -> SecretBox:
    return SecretBox(secrets.token_bytes(32))


def flip(text: str, index: int) -> str:
    raw = bytearray(base64.urlsafe_b64decode(text[3:]))
    raw[index] ^= 1
    return "v1:" + base64.urlsafe_b64encode(bytes(raw)).decode()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_round_trip() -> None:
    b = box()
    for value in [SECRETS, None, "plain", 3, ["a", {"b": "ü"}]]:
        assert b.open(b.seal(value)) == value


def test_ciphertext_is_fresh_each_time_and_reveals_nothing() -> None:
    b = box()
    first, second = b.seal(SECRETS), b.seal(SECRETS)
    assert first != second
    for text in (first, second):
        assert text.startswith("v1:")
        base64.urlsafe_b64decode(text[3:])  # the rest is plain urlsafe base64
        for plain in ("s3cr3t", "PASSWORD", "ci-bot", "hdr-SECRET", "basicauth", "password", "user"):
            assert plain not in text and plain.lower() not in text.lower()


def test_wrong_key_is_refused_without_revealing_anything() -> None:
    key = secrets.token_bytes(32)
    sealed = SecretBox(key).seal(SECRETS)
    with pytest.raises(SecretError, match="another key") as info:
        box().open(sealed)
    text = str(info.value)
    assert "s3cr3t" not in text and key.hex() not in text and base64.urlsafe_b64encode(key).decode() not in text


@pytest.mark.parametrize("corrupt", [
    lambda t: flip(t, 5),                                              # altered nonce
    lambda t: flip(t, 40),                                             # altered ciphertext
    lambda t: flip(t, -1),                                             # altered tag
    lambda t: t[:20],                                                  # truncated
    lambda t: "v1:" + "!!not base64!!",
    lambda t: "v1:",
    lambda t: "v2:" + t[3:],                                           # unknown version
    lambda t: t[3:],                                                   # no prefix
    lambda t: '{"basicauth": {"user": "u", "password": "p"}}',         # a plaintext row
])
def test_corrupt_text_is_refused(corrupt) -> None:
    b = box()
    with pytest.raises(SecretError):
        b.open(corrupt(b.seal(SECRETS)))


def test_a_key_must_be_32_bytes() -> None:
    with pytest.raises(SecretError, match="32 bytes"):
        SecretBox(b"short")


def test_key_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    db = tmp_path / "pydlit.db"
    key = load_key(str(db), None)
    key_file = tmp_path / "pydlit.db.key"
    assert len(key) == 32
    assert mode(key_file) == 0o600
    assert base64.urlsafe_b64decode(key_file.read_text().strip()) == key
    assert load_key(str(db), None) == key
    assert [p.name for p in tmp_path.iterdir()] == ["pydlit.db.key"]  # no temporary file left
    # What one start sealed, the next start opens.
    assert SecretBox(load_key(str(db), None)).open(SecretBox(key).seal(SECRETS)) == SECRETS


def test_key_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        load_key(str(tmp_path / "db"), None)
    finally:
        os.umask(old)
    assert mode(tmp_path / "db.key") == 0o600


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604, 0o660])
def test_a_key_file_others_may_read_is_refused(tmp_path: Path, loose: int) -> None:
    db = tmp_path / "pydlit.db"
    load_key(str(db), None)
    os.chmod(tmp_path / "pydlit.db.key", loose)
    with pytest.raises(SecretError, match="chmod 600") as info:
        load_key(str(db), None)
    assert (tmp_path / "pydlit.db.key").read_text().strip() not in str(info.value)


def test_a_key_file_with_no_key_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "db.key"
    key_file.write_text("not a key\n")
    key_file.chmod(0o600)
    with pytest.raises(SecretError, match="does not hold"):
        load_key(str(tmp_path / "db"), None)


def test_memory_database_needs_an_env_key() -> None:
    with pytest.raises(SecretError, match="PYDLIT_SECRET_KEY"):
        load_key(":memory:", None)


def test_unwritable_directory_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    # Root writes into a 0500 directory regardless, so the refusal is simulated.
    def refuse_creation(path: str, flags: int, *args: int) -> int:
        if flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_creation)
    with pytest.raises(SecretError, match="cannot create the secret key file.*Permission denied.*PYDLIT_SECRET_KEY"):
        load_key(str(tmp_path / "pydlit.db"), None)


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match="cannot create the secret key file"):
        load_key(str(tmp_path / "nowhere" / "pydlit.db"), None)


def test_env_key_is_used_and_no_file_is_created(tmp_path: Path) -> None:
    raw = secrets.token_bytes(32)
    db = str(tmp_path / "pydlit.db")
    padded = base64.urlsafe_b64encode(raw).decode()
    assert load_key(db, padded) == raw
    assert load_key(db, padded.rstrip("=")) == raw
    assert load_key(db, f"  {padded}\n") == raw
    assert list(tmp_path.iterdir()) == []


def test_env_passphrase_is_derived_with_hkdf(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    db = str(tmp_path / "pydlit.db")
    key = load_key(db, "a long random passphrase, not base64")
    assert len(key) == 32
    assert key == load_key(db, "a long random passphrase, not base64")
    assert key != load_key(db, "another long random passphrase")
    expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"pydlit PYDLIT_SECRET_KEY v1").derive(
        b"a long random passphrase, not base64"
    )
    assert key == expected
    # base64 of some other length is a passphrase too, not a short key.
    assert len(load_key(db, base64.urlsafe_b64encode(b"x" * 16).decode())) == 32
    assert list(tmp_path.iterdir()) == []


def test_env_key_wins_over_an_existing_key_file(tmp_path: Path) -> None:
    db = str(tmp_path / "pydlit.db")
    file_key = load_key(db, None)
    raw = secrets.token_bytes(32)
    assert load_key(db, base64.urlsafe_b64encode(raw).decode()) == raw != file_key
    assert load_key(db, "") == file_key  # an empty variable counts as unset


def test_a_node_that_loses_the_creation_race_uses_the_winners_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    winner = secrets.token_bytes(32)
    real_link = os.link

    def another_node_first(src: str, dst: str) -> None:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, base64.urlsafe_b64encode(winner) + b"\n")
        os.close(fd)
        real_link(src, dst)

    monkeypatch.setattr(os, "link", another_node_first)
    assert load_key(str(tmp_path / "pydlit.db"), None) == winner
    assert [p.name for p in tmp_path.iterdir()] == ["pydlit.db.key"]
