"""Known-answer and property tests of the crypto primitives (privacy/secagg/crypto.py)."""

from __future__ import annotations

import numpy as np
import pytest

from privacy.secagg.crypto import (
    add_masks,
    aead_decrypt,
    aead_encrypt,
    aes256_ctr_keystream,
    hkdf_sha256,
    prg_bytes,
    prg_words,
    sha256,
    x25519_keypair,
    x25519_public_key,
    x25519_shared_secret,
    x25519_shared_secrets,
)

h = bytes.fromhex


# --- X25519: RFC 7748 -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scalar", "u", "out"),
    [  # RFC 7748 section 5.2
        (
            "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
            "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
            "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
        ),
        (
            "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
            "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
            "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
        ),
    ],
)
def test_x25519_rfc7748_vectors(scalar: str, u: str, out: str) -> None:
    assert x25519_shared_secret(h(scalar), h(u)) == h(out)


def test_x25519_rfc7748_diffie_hellman() -> None:
    # RFC 7748 section 6.1
    alice_sk = h("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    alice_pk = h("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    bob_sk = h("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    bob_pk = h("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = h("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")

    assert x25519_public_key(alice_sk) == alice_pk
    assert x25519_public_key(bob_sk) == bob_pk
    assert x25519_shared_secret(alice_sk, bob_pk) == shared
    assert x25519_shared_secrets(bob_sk, [alice_pk, alice_pk]) == [shared, shared]


def test_x25519_fresh_pairs_agree_and_reject_low_order_points() -> None:
    a_sk, a_pk = x25519_keypair()
    b_sk, b_pk = x25519_keypair()

    assert len(a_sk) == len(a_pk) == 32
    assert x25519_shared_secret(a_sk, b_pk) == x25519_shared_secret(b_sk, a_pk)
    with pytest.raises(ValueError):
        x25519_shared_secret(a_sk, bytes(32))  # the all-zero point gives an all-zero secret


# --- HKDF-SHA256: RFC 5869 ------------------------------------------------------------------
def test_hkdf_rfc5869_case1() -> None:
    okm = hkdf_sha256(b"\x0b" * 22, salt=h("000102030405060708090a0b0c"), info=h("f0f1f2f3f4f5f6f7f8f9"), length=42)
    assert okm == h("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")


def test_hkdf_rfc5869_case3_empty_salt_and_info() -> None:
    okm = hkdf_sha256(b"\x0b" * 22, salt=b"", info=b"", length=42)
    assert okm == h("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8")


def test_sha256_known_answer() -> None:
    assert sha256(b"abc") == h("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


# --- AES-256-GCM ------------------------------------------------------------------------------
def test_aead_decrypts_gcm_spec_test_case_16() -> None:
    # McGrew & Viega, "The Galois/Counter Mode of Operation", test case 16 (AES-256, 96-bit IV, AAD)
    key = h("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
    iv = h("cafebabefacedbaddecaf888")
    aad = h("feedfacedeadbeeffeedfacedeadbeefabaddad2")
    plain = h(
        "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
        "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
    )
    cipher = h(
        "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
        "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
    )
    tag = h("76fc6ece0f4e1768cddf8853bb2d551b")

    assert aead_decrypt(key, iv + cipher + tag, aad) == plain


def test_aead_round_trip_and_tamper_detection() -> None:
    key = bytes(range(32))
    blob = aead_encrypt(key, b"share", b"aad")

    assert aead_decrypt(key, blob, b"aad") == b"share"
    assert aead_encrypt(key, b"share", b"aad") != blob  # random nonce
    with pytest.raises(ValueError, match="authentication"):
        aead_decrypt(key, blob, b"other aad")
    with pytest.raises(ValueError, match="authentication"):
        aead_decrypt(key, blob[:-1] + bytes([blob[-1] ^ 1]), b"aad")
    with pytest.raises(ValueError, match="authentication"):
        aead_decrypt(bytes(32), blob, b"aad")
    with pytest.raises(ValueError, match="too short"):
        aead_decrypt(key, b"abc", b"aad")


# --- AES-256-CTR keystream (the mask PRG): NIST SP 800-38A F.5.5 ------------------------------
def test_ctr_keystream_sp800_38a_f55() -> None:
    key = h("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    counter = h("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    plain = h(
        "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
        "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710"
    )
    cipher = h(
        "601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5"
        "2b0930daa23de94ce87017ba2d84988ddfc9c58db67aada613c2dd08457941a6"
    )

    stream = aes256_ctr_keystream(key, counter, len(plain))

    assert bytes(a ^ b for a, b in zip(stream, plain, strict=True)) == cipher


def test_prg_is_deterministic_seed_dependent_and_prefix_consistent() -> None:
    seed = bytes(range(32))

    assert prg_bytes(seed, 100) == prg_bytes(seed, 100)
    assert prg_bytes(seed, 100)[:40] == prg_bytes(seed, 40)
    assert prg_bytes(seed, 64) != prg_bytes(bytes(32), 64)
    with pytest.raises(ValueError, match="32 bytes"):
        prg_bytes(b"short", 10)


def test_prg_words_are_little_endian_words_of_the_keystream() -> None:
    seed = bytes(range(32))
    raw = prg_bytes(seed, 5 * 8)

    w32 = prg_words(seed, 10, np.uint32)
    w64 = prg_words(seed, 5, np.uint64)

    assert w32.tolist() == [int.from_bytes(raw[4 * i : 4 * i + 4], "little") for i in range(10)]
    assert w64.tolist() == [int.from_bytes(raw[8 * i : 8 * i + 8], "little") for i in range(5)]


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_add_masks_is_signed_sum_modulo_the_word_size(dtype: type) -> None:
    rng = np.random.default_rng(0)
    bits = np.dtype(dtype).itemsize * 8
    acc = rng.integers(0, 2**32, size=257, dtype=np.uint64).astype(dtype)
    start = acc.copy()
    seeds = [bytes([i]) * 32 for i in range(3)]
    signs = [1, -1, 1]

    add_masks(acc, seeds, signs)

    expected = [int(v) for v in start]
    for seed, sign in zip(seeds, signs, strict=True):
        for i, m in enumerate(prg_words(seed, acc.size, dtype).tolist()):
            expected[i] = (expected[i] + sign * m) % 2**bits
    assert acc.tolist() == expected


def test_add_masks_plus_then_minus_cancels_and_validates_arguments() -> None:
    acc = np.arange(1000, dtype=np.uint32)
    seed = b"\x07" * 32

    add_masks(acc, [seed, seed], [1, -1])

    assert acc.tolist() == list(range(1000))
    with pytest.raises(ValueError):
        add_masks(acc.astype(np.int64), [seed], [1])
    with pytest.raises(ValueError):
        add_masks(acc, [seed], [0])
    with pytest.raises(ValueError):
        add_masks(acc, [seed], [])
