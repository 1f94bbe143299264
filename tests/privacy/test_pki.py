"""The deployment PKI: each small function, then the idempotent directory writer."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from privacy.pki import (
    PkiError,
    cert_hosts,
    check_private_permissions,
    ensure_pki,
    load_node_private_key,
    load_node_public_key,
    make_ca,
    make_node_keypair,
    make_server_cert,
    new_ec_key,
    ssh_fingerprint,
    valid_node_name,
    write_private,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_is_a_self_signed_ca_limited_to_end_entities():
    key = new_ec_key()
    ca = make_ca(key)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    assert ca.issuer == ca.subject
    key.public_key().verify(ca.signature, ca.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))


def test_server_cert_names_its_hosts_and_chains_to_the_ca():
    ca_key = new_ec_key()
    ca = make_ca(ca_key)
    cert = make_server_cert(new_ec_key(), ca_key, ca, hosts=["127.0.0.1", "localhost", "coord.example"])
    assert sorted(cert_hosts(cert)) == ["127.0.0.1", "coord.example", "localhost"]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca)


@pytest.mark.parametrize("hosts", [[], ["bad host"]])
def test_server_cert_rejects_bad_hosts(hosts):
    ca_key = new_ec_key()
    with pytest.raises(ValueError):
        make_server_cert(new_ec_key(), ca_key, make_ca(ca_key), hosts=hosts)


def test_node_keypair_is_openssh_ecdsa_that_flower_loads():
    private, public = make_node_keypair(comment="books")
    key = serialization.load_ssh_private_key(private, password=None)  # what flower-supernode does
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert public.startswith(b"ecdsa-sha2-nistp384 ") and public.rstrip().endswith(b" books")
    assert load_node_public_key(public) == key.public_key()  # what `flwr supernode register` accepts


def test_non_ec_node_key_is_refused():
    line = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(PkiError, match="ECDSA"):
        load_node_public_key(line)
    with pytest.raises(PkiError):
        load_node_public_key(b"not a key")


def test_fingerprint_is_stable_and_sha256():
    _, public = make_node_keypair()
    fp = ssh_fingerprint(public)
    assert fp.startswith("SHA256:") and fp == ssh_fingerprint(public) and "=" not in fp


def test_private_keys_are_0600_and_never_overwritten(tmp_path):
    path = tmp_path / "keys" / "k.key"
    write_private(path, b"secret")
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    with pytest.raises(PkiError, match="refusing to overwrite"):
        write_private(path, b"other")
    assert path.read_bytes() == b"secret"
    path.chmod(0o644)
    with pytest.raises(PkiError, match="readable by others"):
        check_private_permissions(path)


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "x" * 64, "sp ace"])
def test_bad_node_names(name):
    with pytest.raises(ValueError):
        valid_node_name(name)


def test_ensure_pki_writes_a_tight_directory_and_is_idempotent(tmp_path):
    root = tmp_path / "certs"
    first = ensure_pki(root, node_names=["books", "toys"])
    layout = first.layout
    assert _mode(root) == 0o700 and _mode(layout.nodes) == 0o700
    for private in (layout.ca_key, layout.server_key, layout.node_key("books"), layout.node_key("toys")):
        assert _mode(private) == 0o600
    assert len(first.created) == 8 and not first.kept
    before = {p: p.read_bytes() for p in first.created}
    again = ensure_pki(root, node_names=["books", "toys", "garden"])
    assert {p: p.read_bytes() for p in before} == before, "re-running must keep every existing key"
    assert set(again.created) == {layout.node_key("garden"), layout.node_pub("garden")}
    # a changed host list re-issues the server certificate with the same key
    third = ensure_pki(root, node_names=[], hosts=["127.0.0.1", "coord.example"])
    assert layout.server_cert in third.created and layout.server_key in third.kept
    cert = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    assert "coord.example" in cert_hosts(cert)


def test_ensure_pki_nodes_only_and_lost_public_key(tmp_path):
    report = ensure_pki(tmp_path / "dept", node_names=["books"], with_ca=False)
    assert not report.layout.ca_cert.exists()
    pub = report.layout.node_pub("books")
    original = pub.read_bytes()
    pub.unlink()
    again = ensure_pki(tmp_path / "dept", node_names=["books"], with_ca=False)
    assert pub in again.created and load_node_public_key(pub.read_bytes()) == load_node_public_key(original)


def test_ensure_pki_refuses_a_ca_certificate_without_its_key(tmp_path):
    report = ensure_pki(tmp_path / "c")
    report.layout.ca_key.unlink()
    with pytest.raises(PkiError, match="without its key"):
        ensure_pki(tmp_path / "c")


def test_node_private_key_loader_accepts_only_ecdsa():
    private, public = make_node_keypair()
    assert load_node_private_key(private).public_key() == load_node_public_key(public)
    ed = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    with pytest.raises(PkiError, match="ECDSA"):
        load_node_private_key(ed)
    with pytest.raises(PkiError):
        load_node_private_key(b"-----BEGIN NOTHING-----")


def test_the_server_certificate_always_names_loopback(tmp_path):
    # fedmart coordinate runs the SuperLink on 127.0.0.1 behind the Fleet gate, whatever names nodes dial.
    layout = ensure_pki(tmp_path / "certs", hosts=["coord.example"]).layout

    cert = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())

    assert sorted(cert_hosts(cert)) == ["127.0.0.1", "coord.example"]
