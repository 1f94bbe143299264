"""The deployment's small PKI: a CA, the coordinator's TLS certificate, the nodes' auth keys.

Two separate mechanisms, each with its own keys:

* **TLS** (transport): the coordinator's SuperLink serves HTTPS with a certificate signed
  by a private CA; every node and the ``flwr`` CLI trust that CA (``ca.pem``) and nothing
  else. The certificate's subjectAltName must name the address the nodes dial
  (``127.0.0.1``, ``localhost``, the coordinator's DNS name, ...).
* **Node authentication** (identity): each node holds an EC key pair in OpenSSH format
  (what Flower 1.41's ``flower-supernode --auth-supernode-private-key`` loads). The
  SuperLink (``--enable-supernode-auth``) accepts a node only if its *public* key was
  registered beforehand (``flwr supernode register``); the node signs a timestamp with
  its private key on every Fleet request.

Everything here is small bytes-in, bytes-out functions on ``cryptography`` primitives,
plus :func:`ensure_pki`, which writes a directory idempotently: existing keys are kept,
only what is missing (or a server certificate whose names changed) is (re)issued. Private
keys are written 0600 inside 0700 directories, atomically, and never overwritten.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import re
import stat
from base64 import b64encode
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "PkiError",
    "PkiLayout",
    "PkiReport",
    "DEFAULT_HOSTS",
    "NODE_CURVE",
    "new_ec_key",
    "private_key_pem",
    "make_ca",
    "make_server_cert",
    "cert_hosts",
    "cert_pem",
    "make_node_keypair",
    "ensure_node_keypair",
    "node_public_key_openssh",
    "load_node_public_key",
    "load_node_private_key",
    "ssh_fingerprint",
    "write_private",
    "write_public",
    "check_private_permissions",
    "valid_node_name",
    "ensure_pki",
]

log = logging.getLogger(__name__)

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
LOOPBACK = "127.0.0.1"  # always named: the SuperLink listens there, behind the Fleet gate
NODE_CURVE = ec.SECP384R1  # Flower's docs use ECDSA P-384 (`ssh-keygen -t ecdsa -b 384`); any NIST curve works
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class PkiError(ValueError):
    """A key or certificate file is missing, malformed, or too widely readable."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_ec_key(curve: type[ec.EllipticCurve] = ec.SECP256R1) -> ec.EllipticCurvePrivateKey:
    """A fresh EC private key (P-256 by default: TLS keys)."""
    return ec.generate_private_key(curve())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (the file's permissions protect it)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(
    key: ec.EllipticCurvePrivateKey, *, common_name: str = "fedmart deployment CA", days: int = 3650
) -> x509.Certificate:
    """A self-signed CA certificate that may sign only end-entity certificates (path length 0)."""
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _san(hosts: list[str] | tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if not h or any(c.isspace() for c in h):
                raise ValueError(f"not a host name or IP address: {h!r}") from None
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_server_cert(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    hosts: list[str] | tuple[str, ...] = DEFAULT_HOSTS,
    days: int = 825,
) -> x509.Certificate:
    """A TLS server certificate for ``hosts`` (IPs and DNS names), signed by the CA."""
    if not hosts:
        raise ValueError("hosts must name at least one IP address or DNS name")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,  # type: ignore[arg-type]
        )
        .sign(ca_key, hashes.SHA256())
    )


def cert_hosts(cert: x509.Certificate) -> list[str]:
    """The IP addresses and DNS names in a certificate's subjectAltName."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] + list(san.get_values_for_type(x509.DNSName))


def make_node_keypair(comment: str = "") -> tuple[bytes, bytes]:
    """A node's authentication key pair as (OpenSSH private key, OpenSSH public key line).

    EC P-384 in OpenSSH format: ``flower-supernode --auth-supernode-private-key`` loads the
    first, ``flwr supernode register`` the second.
    """
    key = ec.generate_private_key(NODE_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    return private, node_public_key_openssh(key.public_key(), comment)


def node_public_key_openssh(public_key: ec.EllipticCurvePublicKey, comment: str = "") -> bytes:
    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + (b" " + comment.encode() if comment else b"") + b"\n"


def load_node_public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """Parse an OpenSSH public key line; only NIST EC keys are node keys (Flower's rule)."""
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"not an OpenSSH public key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise PkiError(f"a node key must be ECDSA on a NIST curve (P-256/384/521), got {type(key).__name__}")
    return key


def load_node_private_key(data: bytes) -> ec.EllipticCurvePrivateKey:
    """Parse an OpenSSH private key as ``flower-supernode`` does: unencrypted ECDSA only."""
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"not an unencrypted OpenSSH private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"a node key must be ECDSA on a NIST curve, got {type(key).__name__}")
    return key


def ssh_fingerprint(public_line: bytes) -> str:
    """``SHA256:...`` as ``ssh-keygen -lf`` prints it."""
    blob = public_line.split()[1]
    from base64 import b64decode

    digest = hashlib.sha256(b64decode(blob)).digest()
    return "SHA256:" + b64encode(digest).decode().rstrip("=")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_private(path: Path, data: bytes) -> None:
    """Write a private key: 0600, atomically, and never over an existing file."""
    if path.exists():
        raise PkiError(f"{path} exists; refusing to overwrite a private key (delete it to rotate)")
    _secure_dir(path.parent)
    _write_atomic(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Write a certificate or public key: 0644, atomically."""
    _secure_dir(path.parent)
    _write_atomic(path, data, 0o644)


def _secure_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)


def check_private_permissions(path: Path) -> None:
    """Refuse a private key that others can read (group/other bits set)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise PkiError(f"{path}: no such key file") from None
    if mode & 0o077:
        raise PkiError(f"{path} is readable by others (mode {oct(mode)}); run `chmod 600 {path}`")


def valid_node_name(name: str) -> str:
    """A node name usable as a file name: letters, digits, '-', '_', '.' (not first)."""
    if not _NAME.match(name):
        raise ValueError(f"node name {name!r} must be 1-63 letters, digits, '-', '_' or '.', not starting with . - _")
    return name


@dataclass(frozen=True)
class PkiLayout:
    """Where :func:`ensure_pki` puts things under its directory."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def nodes(self) -> Path:
        return self.root / "nodes"

    def node_key(self, name: str) -> Path:
        return self.nodes / f"{valid_node_name(name)}.key"

    def node_pub(self, name: str) -> Path:
        return self.nodes / f"{valid_node_name(name)}.pub"


@dataclass
class PkiReport:
    """What :func:`ensure_pki` did: files created, files kept as they were, and why."""

    layout: PkiLayout
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _load_pem_key(path: Path) -> ec.EllipticCurvePrivateKey:
    check_private_permissions(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path}: not a PEM private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: expected an EC key, got {type(key).__name__}")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM certificate ({exc})") from exc


def _ensure_ca(layout: PkiLayout, report: PkiReport) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if layout.ca_key.exists():
        ca_key = _load_pem_key(layout.ca_key)
        report.kept.append(layout.ca_key)
        if not layout.ca_cert.exists():
            raise PkiError(f"{layout.ca_key} exists but {layout.ca_cert} is missing; restore it or start afresh")
        ca_cert = _load_cert(layout.ca_cert)
        if ca_cert.public_key() != ca_key.public_key():
            raise PkiError(f"{layout.ca_cert} does not belong to {layout.ca_key}")
        report.kept.append(layout.ca_cert)
        return ca_key, ca_cert
    if layout.ca_cert.exists():
        raise PkiError(f"{layout.ca_cert} exists without its key {layout.ca_key}; cannot issue certificates")
    ca_key = new_ec_key()
    ca_cert = make_ca(ca_key)
    write_private(layout.ca_key, private_key_pem(ca_key))
    write_public(layout.ca_cert, cert_pem(ca_cert))
    report.created += [layout.ca_key, layout.ca_cert]
    return ca_key, ca_cert


def _ensure_server(
    layout: PkiLayout,
    report: PkiReport,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: list[str],
) -> None:
    if layout.server_key.exists():
        key = _load_pem_key(layout.server_key)
        report.kept.append(layout.server_key)
    else:
        key = new_ec_key()
        write_private(layout.server_key, private_key_pem(key))
        report.created.append(layout.server_key)
    if layout.server_cert.exists():
        cert = _load_cert(layout.server_cert)
        same_key = cert.public_key() == key.public_key()
        same_ca = cert.issuer == ca_cert.subject
        fresh = cert.not_valid_after_utc > _now() + dt.timedelta(days=1)
        if same_key and same_ca and fresh and sorted(cert_hosts(cert)) == sorted(hosts):
            report.kept.append(layout.server_cert)
            return
        report.notes.append(f"re-issued {layout.server_cert.name} (names, key, CA or validity changed)")
    write_public(layout.server_cert, cert_pem(make_server_cert(key, ca_key, ca_cert, hosts=hosts)))
    report.created.append(layout.server_cert)


def ensure_node_keypair(key_path: Path, pub_path: Path, name: str) -> tuple[list[Path], list[Path]]:
    """A node's authentication key pair at ``key_path`` (0600) and ``pub_path``: kept if there, else made.

    Returns (created, kept). A lost ``.pub`` is rewritten from the private key; a private key is
    never overwritten. What a department runs on its own machine (``fedmart node keygen``).
    """
    valid_node_name(name)
    if key_path.exists():
        check_private_permissions(key_path)
        try:
            private = load_node_private_key(key_path.read_bytes())
        except PkiError as exc:
            raise PkiError(f"{key_path}: {exc}") from exc
        line = node_public_key_openssh(private.public_key(), name)
        if not pub_path.exists() or load_node_public_key(pub_path.read_bytes()) != private.public_key():
            write_public(pub_path, line)
            return [pub_path], [key_path]
        return [], [key_path, pub_path]
    private_bytes, public = make_node_keypair(comment=name)
    write_private(key_path, private_bytes)
    write_public(pub_path, public)
    return [key_path, pub_path], []


def _ensure_node(layout: PkiLayout, report: PkiReport, name: str) -> None:
    created, kept = ensure_node_keypair(layout.node_key(name), layout.node_pub(name), name)
    report.created += created
    report.kept += kept


def ensure_pki(
    root: str | Path,
    *,
    node_names: list[str] | tuple[str, ...] = (),
    hosts: list[str] | tuple[str, ...] = DEFAULT_HOSTS,
    with_ca: bool = True,
) -> PkiReport:
    """Create what is missing under ``root``; keep every existing key.

    Layout: ``ca.pem``/``ca.key`` (CA), ``server.pem``/``server.key`` (the coordinator's TLS
    certificate for ``hosts``), ``nodes/<name>.key``/``nodes/<name>.pub`` (one
    authentication key pair per node). ``with_ca=False`` writes node keys only (what a
    department runs on its own machine, sending just the ``.pub`` to the coordinator).
    ``127.0.0.1`` is always among the server's names: ``fedmart coordinate`` runs the
    SuperLink itself on loopback, behind the node-facing Fleet gate.
    """
    names = [valid_node_name(n) for n in node_names]
    if len(set(names)) != len(names):
        raise ValueError(f"node names must be unique, got {names}")
    layout = PkiLayout(Path(root))
    _secure_dir(layout.root)
    report = PkiReport(layout)
    if with_ca:
        hosts = list(hosts) + ([LOOPBACK] if LOOPBACK not in hosts else [])
        _san(hosts)  # reject bad names before writing anything
        ca_key, ca_cert = _ensure_ca(layout, report)
        _ensure_server(layout, report, ca_key, ca_cert, hosts)
    for name in names:
        _ensure_node(layout, report, name)
    log.info("PKI in %s: %d created, %d kept", layout.root, len(report.created), len(report.kept))
    return report
