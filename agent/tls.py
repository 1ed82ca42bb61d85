"""TLS client contexts for the platform and the syslog target.

Policy: TLS 1.2 or newer, the pinned CA only (the system trust store is never loaded),
hostname checked, certificate required. Certificate validity times are checked against the
platform-synced clock (``agent.timesync.Clock``) rather than the raw system clock: OpenSSL's
own time check is switched off (X509_V_FLAG_NO_CHECK_TIME) and replaced by a check that
runs right after every handshake, before any byte of application data is sent. Everything
else (signature chain to the pinned CA, hostname, key usage) stays OpenSSL's job.
"""

from __future__ import annotations

import os
import ssl
from datetime import UTC, datetime

from cryptography import x509

from agent.timesync import Clock

# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (x509_vfy.h); Python's ssl module has no name for it.
X509_V_FLAG_NO_CHECK_TIME = 0x200000


# OpenSSL's verify codes, so that callers that print ``verify_message`` work unchanged.
X509_V_ERR_CERT_NOT_YET_VALID = 9
X509_V_ERR_CERT_HAS_EXPIRED = 10


class CertificateTimeError(ssl.SSLCertVerificationError):
    """The peer's certificate is not valid at the platform-synced time."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.verify_message = message
        self.verify_code = code
        self.reason = "CERTIFICATE_VERIFY_FAILED"


def check_validity(cert: x509.Certificate, now: float, what: str) -> None:
    """Raise CertificateTimeError unless *now* lies inside the certificate's validity."""
    when = datetime.fromtimestamp(now, tz=UTC)
    if when < cert.not_valid_before_utc:
        raise CertificateTimeError(
            f"{what} certificate is not yet valid at synced time {when:%Y-%m-%dT%H:%M:%SZ}",
            X509_V_ERR_CERT_NOT_YET_VALID,
        )
    if when > cert.not_valid_after_utc:
        raise CertificateTimeError(
            f"{what} certificate expired before synced time {when:%Y-%m-%dT%H:%M:%SZ}",
            X509_V_ERR_CERT_HAS_EXPIRED,
        )


def _sslobject_class(clock: Clock, ca: list[x509.Certificate]) -> type[ssl.SSLObject]:
    class ClockCheckedSSLObject(ssl.SSLObject):
        """An SSLObject that checks certificate times against *clock* after the handshake."""

        def do_handshake(self) -> None:
            super().do_handshake()
            der = self.getpeercert(binary_form=True)
            if der is None:  # cannot happen with CERT_REQUIRED; refuse rather than assume
                raise ssl.SSLCertVerificationError("peer presented no certificate")
            now = clock.now()
            check_validity(x509.load_der_x509_certificate(der), now, "peer")
            for anchor in ca:
                check_validity(anchor, now, "pinned CA")

    return ClockCheckedSSLObject


def _memfd_path(name: str, data: bytes | bytearray) -> tuple[int, str]:
    # ssl loads certificates and keys from paths only: an anonymous in-memory file keeps the
    # private key off every disk. The caller closes the fd as soon as ssl has read it.
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd, f"/proc/self/fd/{fd}"


def client_context(
    ca_pem: bytes,
    clock: Clock,
    cert_pem: bytes | None = None,
    key_pem: bytes | bytearray | None = None,
) -> ssl.SSLContext:
    """A client context: TLS >= 1.2, *ca_pem* as the only trust anchor, clock-checked times.

    The client key reaches OpenSSL through a memfd (``/proc/self/fd/N``), never a file on
    disk: with the tpm keystore it exists in clear only in (locked) process memory.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    # cadata, never load_default_certs(): the platform's own CA is the only anchor.
    ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
    ctx.verify_flags = ssl.VerifyFlags(int(ctx.verify_flags) | X509_V_FLAG_NO_CHECK_TIME)
    if cert_pem is not None and key_pem is not None:
        cfd, cpath = _memfd_path("client-cert", cert_pem)
        try:
            kfd, kpath = _memfd_path("client-key", key_pem)
            try:
                ctx.load_cert_chain(cpath, kpath)
            finally:
                os.close(kfd)  # the only reference: the memfd's pages are freed here
        finally:
            os.close(cfd)
    anchors = x509.load_pem_x509_certificates(ca_pem)
    ctx.sslobject_class = _sslobject_class(clock, anchors)
    return ctx

