"""The platform's own X.509 CA: root, server certificate, appliance client certificates.

Everything here is built with the `cryptography` x509 API. Keys are ECDSA P-256. The
revocation list itself lives in the database (`db.Storage.revoke`); `build_crl` renders it
as a standard X.509 CRL for integrators who want one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import secrets
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS: Final = 3650
SERVER_DAYS: Final = 825
CLIENT_DAYS: Final = 1825
# Certificates start a little in the past so that an appliance whose clock is slightly
# behind (it syncs from the platform only after its first TLS connection) accepts them.
BACKDATE: Final = dt.timedelta(hours=1)


class CAError(Exception):
    """A certificate or CSR problem; the message says what is wrong, never key bytes."""


@dataclass(frozen=True)
class IssuedCert:
    """An appliance client certificate just signed."""

    pem: bytes
    serial: str  # hex
    fingerprint: str  # SHA-256 of the DER, hex


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def fingerprint(der: bytes) -> str:
    """SHA-256 fingerprint (hex) of a DER certificate: how the platform identifies callers."""
    return hashlib.sha256(der).hexdigest()


def create_ca(common_name: str) -> tuple[bytes, bytes]:
    """A new root CA: (private key PEM, certificate PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "scratchfs reference platform"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
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
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class CA:
    """A loaded CA (key and certificate)."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def __repr__(self) -> str:
        return f"CA(subject={self.cert.subject.rfc4514_string()!r})"

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate as PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)


def load_ca(key_pem: bytes, cert_pem: bytes) -> CA:
    """Load a CA written by create_ca()."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise CAError("CA key or certificate does not parse") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError("CA key is not an EC key")
    return CA(key=key, cert=cert)


def _leaf_builder(
    ca: CA,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey,
    days: int,
) -> x509.CertificateBuilder:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )


def issue_server_cert(ca: CA, hostname: str) -> tuple[bytes, bytes]:
    """Server certificate for *hostname* (DNS name or IP literal): (key PEM, cert PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    san: x509.GeneralName
    try:
        san = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        san = x509.DNSName(hostname)
    cert = (
        _leaf_builder(
            ca,
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]),
            key.public_key(),
            SERVER_DAYS,
        )
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def check_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """Parse a CSR and check its self-signature and key type (P-256, P-384 or Ed25519)."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise CAError("CSR is not a PEM PKCS#10 request") from None
    try:
        valid = csr.is_signature_valid
    except (ValueError, InvalidSignature):
        valid = False
    if not valid:
        raise CAError("CSR signature does not verify")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
            raise CAError("CSR key must be on curve P-256 or P-384")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise CAError("CSR key must be ECDSA P-256/P-384 or Ed25519")
    return csr


def issue_client_cert(ca: CA, csr: x509.CertificateSigningRequest, appliance: str) -> IssuedCert:
    """Sign an appliance client certificate; the subject is the appliance name, not the CSR's."""
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise CAError("CSR key type is not supported")
    cert = (
        _leaf_builder(
            ca,
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "appliance"),
                    x509.NameAttribute(NameOID.COMMON_NAME, appliance),
                ]
            ),
            key,
            CLIENT_DAYS,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    return IssuedCert(
        pem=cert.public_bytes(serialization.Encoding.PEM),
        serial=format(cert.serial_number, "x"),
        fingerprint=fingerprint(der),
    )


def serial_of(der: bytes) -> str:
    """Hex serial number of a DER certificate."""
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


def build_crl(ca: CA, revoked: list[tuple[str, float]], days: int = 7) -> bytes:
    """An X.509 CRL (PEM) listing (hex serial, revoked-at epoch) pairs from the database."""
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=days))
    )
    for serial_hex, at in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(int(serial_hex, 16))
            .revocation_date(dt.datetime.fromtimestamp(at, dt.UTC))
            .build()
        )
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def new_activation_code() -> str:
    """A one-time activation code: 20 base32 characters (100 bits) in groups of five."""
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # 32 symbols, no 0/O/1/I look-alikes
    raw = "".join(secrets.choice(alphabet) for _ in range(20))
    return "-".join(raw[i : i + 5] for i in range(0, 20, 5))


def code_hash(code: str) -> bytes:
    """What the database stores instead of the code (normalised: case, dashes, spaces)."""
    norm = "".join(code.split()).replace("-", "").upper()
    return hashlib.sha256(b"scratchfs-activation-code\x00" + norm.encode()).digest()
