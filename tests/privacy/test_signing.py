"""Ed25519 key files and sign/verify (privacy/signing.py)."""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.signing import (
    KeyFileError,
    export_public_key,
    key_fingerprint,
    load_or_create_keypair,
    load_private_key,
    load_public_key,
    public_key_path_for,
    sign,
    verify,
)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_first_use_creates_a_private_key_readable_by_its_owner_only(tmp_path):
    key_path = tmp_path / "keys" / "signing.pem"

    private, public = load_or_create_keypair(key_path)

    assert _mode(key_path) == 0o600
    assert _mode(key_path.parent) == 0o700
    assert public_key_path_for(key_path).is_file()
    assert key_fingerprint(load_public_key(public_key_path_for(key_path))) == key_fingerprint(public)


def test_second_use_loads_the_same_key(tmp_path):
    key_path = tmp_path / "k.pem"
    _, first = load_or_create_keypair(key_path)

    _, second = load_or_create_keypair(key_path)

    assert key_fingerprint(first) == key_fingerprint(second)


def test_a_key_others_can_read_is_refused(tmp_path):
    key_path = tmp_path / "k.pem"
    load_or_create_keypair(key_path)
    os.chmod(key_path, 0o644)

    with pytest.raises(KeyFileError, match="chmod 600"):
        load_private_key(key_path)


def test_public_key_errors_name_the_file(tmp_path):
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key")

    with pytest.raises(KeyFileError, match="junk.pub"):
        load_public_key(junk)
    with pytest.raises(KeyFileError, match="not found"):
        load_public_key(tmp_path / "missing.pub")


def test_export_writes_a_loadable_public_key(tmp_path):
    _, public = load_or_create_keypair(tmp_path / "k.pem")

    path = export_public_key(public, tmp_path / "elsewhere" / "copy.pub")

    assert key_fingerprint(load_public_key(path)) == key_fingerprint(public)


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=512), flip=st.integers(min_value=0))
def test_a_signature_verifies_only_for_its_data_and_key(tmp_path_factory, data, flip):
    private, public = load_or_create_keypair(tmp_path_factory.mktemp("k") / "k.pem")
    other_private, other_public = load_or_create_keypair(tmp_path_factory.mktemp("o") / "k.pem")
    sig = sign(private, data)

    assert verify(public, data, sig)
    assert not verify(other_public, data, sig)
    bad_sig = bytearray(sig)
    bad_sig[flip % len(sig)] ^= 0x01
    assert not verify(public, data, bytes(bad_sig))
    if data:
        bad_data = bytearray(data)
        bad_data[flip % len(data)] ^= 0x01
        assert not verify(public, bytes(bad_data), sig)


@pytest.mark.parametrize("signature", [b"", b"short", b"x" * 65, "a string"])
def test_verify_is_false_not_an_exception_for_malformed_signatures(tmp_path, signature):
    _, public = load_or_create_keypair(tmp_path / "k.pem")

    assert verify(public, b"data", signature) is False
