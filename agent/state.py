"""The appliance's activation state: a 0700 directory of 0600 files, bound to the appliance.

Layout (version 1)::

    STATE_DIR/               0700
      state.json             {"version": 1, "platform_url": ..., "appliance": ..., ...}
      ca.pem                 the platform's root CA (the only trust anchor)
      client-cert.pem        this appliance's TLS client certificate (issued by that CA)
      client-key.pem         its P-256 private key (PKCS#8 PEM)
      seal-key.bin           the raw 32-byte X25519 private key that v1 sealed blobs open with
      seal-key-hybrid.bin    the raw 96-byte ML-KEM-768 seed + X25519 private key that v2
                             (HPKE) blobs open with; written at activation, or later by
                             `scanner-agent seal-key upgrade` (appliances activated before v2)
      proxy-credentials      "user:password" for the CONNECT proxy (only when it needs them)
      binding.mac            hex HMAC-SHA256 over the files above (the commit marker)
      volume.img             the LUKS2 volume (created at first boot, not bound: it changes)
      run/                   mount points, pid files, logs of the children (0700)

Binding: ``binding.mac`` is HMAC-SHA256 under a key derived (HKDF-SHA256) from both private
keys (TLS and X25519), over the length-prefixed names and contents of state.json, ca.pem and
client-cert.pem (and proxy-credentials when state.json says there are some). The hybrid key
is not part of the binding so that an existing appliance can add it without rewriting the
commit marker; swapping it can only make blobs fail to open, since the platform learns the
hybrid public key over mutual TLS, never from this file. Only the holder of the
appliance's private keys can produce the binding, so an edited platform URL, an edited or
removed proxy, or a swapped CA is refused at start. On top of that, the client
certificate must be issued by the pinned CA and carry the public key of client-key.pem.
Nothing reads the platform URL or CA from flags, environment variables or other files.

The outbound proxy (optional) is fixed at activation: ``state.json`` holds its URL
(``"proxy": {"url": "http://HOST:PORT", "credentials": bool}``, absent without a proxy, so
states activated before proxies existed verify unchanged); its credentials are an appliance
secret kept next to the private keys and read and written only by
`load_proxy_credentials` / `store_proxy_credentials`.
"""

from __future__ import annotations

import hmac
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.errors import StateError, TamperedError
from protocol import sealing
from protocol.proxy import ProxyConfig, check_credentials
from scratchfs.keyholder.wipe import wipe

STATE_VERSION: Final = 1
STATE_JSON: Final = "state.json"
CA_PEM: Final = "ca.pem"
CERT_PEM: Final = "client-cert.pem"
KEY_PEM: Final = "client-key.pem"
SEAL_KEY: Final = "seal-key.bin"
SEAL_KEY_HYBRID: Final = "seal-key-hybrid.bin"
BINDING: Final = "binding.mac"
PROXY_CREDENTIALS: Final = "proxy-credentials"
MAX_PROXY_CREDENTIALS: Final = 1024  # bytes of "user:password"
VOLUME_IMAGE: Final = "volume.img"
RUN_DIR: Final = "run"
BOUND_FILES: Final = (STATE_JSON, CA_PEM, CERT_PEM)
SECRET_FILES: Final = (KEY_PEM, SEAL_KEY)
ALL_FILES: Final = (*BOUND_FILES, *SECRET_FILES, BINDING)
_BINDING_INFO: Final = b"scanner-agent/state-binding/v1"


@dataclass(frozen=True)
class PlatformEndpoint:
    """Where the platform is: an https URL split into host and port."""

    url: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> PlatformEndpoint:
        """Validate an ``https://host[:port]`` URL; raise ValueError with a clear message."""
        parts = urlsplit(url)
        if parts.scheme != "https":
            raise ValueError(f"platform URL must start with https:// (got {url!r})")
        if not parts.hostname:
            raise ValueError(f"platform URL has no host (got {url!r})")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ValueError(f"platform URL must be https://HOST[:PORT] only (got {url!r})")
        try:
            port = parts.port or 443
        except ValueError:
            raise ValueError(f"platform URL has an invalid port (got {url!r})") from None
        return cls(url=f"https://{parts.netloc}", host=parts.hostname, port=port)


class AgentState:
    """A verified, loaded state directory. repr() never shows key material."""

    def __init__(
        self,
        root: Path,
        endpoint: PlatformEndpoint,
        appliance: str,
        ca_pem: bytes,
        cert_pem: bytes,
        seal_private: bytearray,
        hybrid_private: bytearray | None = None,
        proxy: ProxyConfig | None = None,
    ) -> None:
        self.root = root
        self.endpoint = endpoint
        self.appliance = appliance
        self.ca_pem = ca_pem
        self.cert_pem = cert_pem
        self._seal_private = seal_private
        self._hybrid_private = hybrid_private
        self.proxy = proxy  # every platform and syslog connection goes through it when set

    def __repr__(self) -> str:
        return f"<AgentState root={str(self.root)!r} appliance={self.appliance!r}>"

    @property
    def cert_path(self) -> Path:
        """Path of the client certificate (ssl loads certificate chains from files only)."""
        return self.root / CERT_PEM

    @property
    def key_path(self) -> Path:
        """Path of the TLS private key (0600)."""
        return self.root / KEY_PEM

    @property
    def volume_image(self) -> Path:
        """Path of the LUKS2 volume image."""
        return self.root / VOLUME_IMAGE

    @property
    def run_dir(self) -> Path:
        """Directory for mount points, pid files and child logs (created 0700)."""
        return self.root / RUN_DIR

    def seal_private(self) -> bytearray:
        """The X25519 private key, for opening one sealed blob; do not keep a reference."""
        if not any(self._seal_private):
            raise StateError("the sealing key was already forgotten", "restart the agent")
        return self._seal_private

    @property
    def has_hybrid_key(self) -> bool:
        """Whether this appliance holds a hybrid (sealing v2) key."""
        return self._hybrid_private is not None

    def open_sealed(self, sealed: bytes, context: bytes) -> bytearray:
        """Open a v1 or v2 blob with whichever key it needs; the caller wipes the result.

        Raise sealing.SealError (one line, says what to do) when it does not open.
        """
        return sealing.open_any(self.seal_private(), self._hybrid_private, sealed, context)

    def forget(self) -> None:
        """Overwrite the in-memory sealing keys."""
        wipe(self._seal_private)
        if self._hybrid_private is not None:
            wipe(self._hybrid_private)


# --- writing ---------------------------------------------------------------------------


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # umask must not widen or narrow what we meant
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _binding_key(tls_key_pem: bytes, seal_private: bytes | bytearray) -> bytes:
    key = serialization.load_pem_private_key(tls_key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TamperedError(f"{KEY_PEM} is not an EC private key")
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    return HKDF(hashes.SHA256(), 32, salt=None, info=_BINDING_INFO).derive(
        scalar + bytes(seal_private)
    )


def _binding_mac(key: bytes, contents: dict[str, bytes]) -> str:
    mac = hmac.new(key, digestmod="sha256")
    # The proxy credentials are bound only when present, so that the MAC of a state without
    # a proxy is what it always was.
    names = (*BOUND_FILES, PROXY_CREDENTIALS) if PROXY_CREDENTIALS in contents else BOUND_FILES
    for name in names:
        data = contents[name]
        mac.update(len(name).to_bytes(2, "big") + name.encode())
        mac.update(len(data).to_bytes(8, "big") + data)
    return mac.hexdigest()


def write_state(
    root: Path,
    endpoint: PlatformEndpoint,
    appliance: str,
    ca_pem: bytes,
    cert_pem: bytes,
    tls_key_pem: bytes,
    seal_private: bytes | bytearray,
    activated_at: float,
    hybrid_private: bytes | bytearray | None = None,
    proxy: ProxyConfig | None = None,
) -> None:
    """Create the state directory (must be absent or empty) and bind it; binding.mac last."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise StateError(
            f"state dir {root} is not empty", "use an empty or new directory for activation"
        )
    os.chmod(root, 0o700)
    doc: dict[str, Any] = {
        "version": STATE_VERSION,
        "platform_url": endpoint.url,
        "appliance": appliance,
        "activated_at": activated_at,
    }
    if proxy is not None:
        doc["proxy"] = {"url": proxy.url, "credentials": proxy.credentials is not None}
    contents = {
        STATE_JSON: (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(),
        CA_PEM: ca_pem,
        CERT_PEM: cert_pem,
    }
    for name, data in contents.items():
        _write_new(root / name, data)
    _write_new(root / KEY_PEM, tls_key_pem)
    _write_new(root / SEAL_KEY, bytes(seal_private))
    if hybrid_private is not None:
        _write_new(root / SEAL_KEY_HYBRID, bytes(hybrid_private))
    if proxy is not None and proxy.credentials is not None:
        store_proxy_credentials(root, proxy.credentials)
        contents[PROXY_CREDENTIALS] = proxy.credentials
    mac = _binding_mac(_binding_key(tls_key_pem, seal_private), contents)
    _write_new(root / BINDING, (mac + "\n").encode())
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- loading ---------------------------------------------------------------------------


def _check_mode(path: Path, want: int, is_dir: bool) -> None:
    st = os.lstat(path)
    kind_ok = stat.S_ISDIR(st.st_mode) if is_dir else stat.S_ISREG(st.st_mode)
    if not kind_ok:
        raise TamperedError(f"{path} is not a regular {'directory' if is_dir else 'file'}")
    if st.st_uid != os.geteuid():
        raise StateError(
            f"{path} is owned by uid {st.st_uid}, not by the agent's uid {os.geteuid()}",
            "chown the state dir back to the agent's user",
        )
    if stat.S_IMODE(st.st_mode) != want:
        raise StateError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}, expected {want:04o}",
            f"chmod {want:o} {path}",
        )


def load_state(root: Path) -> AgentState:
    """Load and verify a state dir; raise StateError or TamperedError (one-line messages)."""
    if not root.is_dir():
        raise StateError(f"state dir {root} does not exist")
    if not (root / STATE_JSON).exists():
        raise StateError(f"state dir {root} holds no activation ({STATE_JSON} missing)")
    _check_mode(root, 0o700, is_dir=True)
    missing = [n for n in ALL_FILES if not (root / n).exists()]
    if missing:
        raise TamperedError(f"state dir {root} is incomplete (missing {', '.join(missing)})")
    for name in ALL_FILES:
        _check_mode(root / name, 0o600, is_dir=False)
    contents = {name: (root / name).read_bytes() for name in BOUND_FILES}
    proxy_doc = _proxy_doc(contents[STATE_JSON])
    if proxy_doc is not None and proxy_doc.get("credentials") is True:
        contents[PROXY_CREDENTIALS] = load_proxy_credentials(root)
    elif (root / PROXY_CREDENTIALS).exists():
        raise TamperedError(f"state dir {root} holds {PROXY_CREDENTIALS} but no proxy needs them")
    tls_key_pem = (root / KEY_PEM).read_bytes()
    seal_private = bytearray((root / SEAL_KEY).read_bytes())
    if len(seal_private) != 32:
        raise TamperedError(f"{SEAL_KEY} is not a 32-byte X25519 key")
    try:
        key = _binding_key(tls_key_pem, seal_private)
    except ValueError:
        raise TamperedError(f"{KEY_PEM} does not parse as a private key") from None
    expected = _binding_mac(key, contents)
    stored = (root / BINDING).read_bytes().strip().decode("ascii", errors="replace")
    if not hmac.compare_digest(expected.encode(), stored.encode()):
        raise TamperedError(
            f"state dir {root} was modified after activation (binding check failed)"
        )
    try:
        doc = json.loads(contents[STATE_JSON])
        endpoint = PlatformEndpoint.parse(str(doc["platform_url"]))
        appliance = str(doc["appliance"])
        if doc.get("version") != STATE_VERSION:
            raise TamperedError(f"unsupported state version {doc.get('version')!r}")
        proxy = None
        if proxy_doc is not None:
            proxy = ProxyConfig.parse(str(proxy_doc["url"]), contents.get(PROXY_CREDENTIALS))
    except (ValueError, KeyError, TypeError) as e:
        raise TamperedError(f"{STATE_JSON} is malformed ({e})") from None
    _check_certificate(contents[CA_PEM], contents[CERT_PEM], tls_key_pem)
    hybrid = load_hybrid_key(root)
    return AgentState(
        root, endpoint, appliance, contents[CA_PEM], contents[CERT_PEM], seal_private, hybrid,
        proxy,
    )


def _proxy_doc(state_json: bytes) -> dict[str, Any] | None:
    """The (not yet verified) proxy entry of state.json: it decides what the MAC covers."""
    try:
        doc = json.loads(state_json)
    except ValueError:
        return None  # reported as a binding failure or malformed state below
    value = doc.get("proxy") if isinstance(doc, dict) else None
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TamperedError(f"{STATE_JSON} has a malformed proxy entry")
    return value


def load_hybrid_key(root: Path) -> bytearray | None:
    """The hybrid sealing private key, or None for an appliance not upgraded yet."""
    path = root / SEAL_KEY_HYBRID
    if not path.exists():
        return None
    _check_mode(path, 0o600, is_dir=False)
    key = bytearray(path.read_bytes())
    if len(key) != sealing.HYBRID_PRIVATE_LEN:
        wipe(key)
        raise TamperedError(
            f"{SEAL_KEY_HYBRID} is not a {sealing.HYBRID_PRIVATE_LEN}-byte hybrid key"
        )
    return key


def store_hybrid_key(root: Path, private: bytes | bytearray) -> None:
    """Add the hybrid key to an activated state dir (atomic: temp file, fsync, rename).

    Refuses to replace an existing one: blobs sealed to it would become unreadable.
    """
    path = root / SEAL_KEY_HYBRID
    if path.exists():
        raise StateError(f"{path} exists already", "keep it; nothing to upgrade")
    tmp = root / (SEAL_KEY_HYBRID + ".tmp")
    tmp.unlink(missing_ok=True)
    _write_new(tmp, bytes(private))
    os.rename(tmp, path)
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def store_proxy_credentials(root: Path, credentials: bytes) -> None:
    """Keep the proxy's "user:password" like the other appliance secrets (0600, state dir)."""
    _write_new(root / PROXY_CREDENTIALS, credentials)


def load_proxy_credentials(root: Path) -> bytes:
    """The proxy's "user:password"; TamperedError when missing, unsafe or malformed."""
    path = root / PROXY_CREDENTIALS
    if not path.exists():
        raise TamperedError(f"state dir {root} is incomplete (missing {PROXY_CREDENTIALS})")
    _check_mode(path, 0o600, is_dir=False)
    data = path.read_bytes()
    try:
        if len(data) > MAX_PROXY_CREDENTIALS:
            raise ValueError("too long")
        check_credentials(data)
    except ValueError:
        raise TamperedError(f"{PROXY_CREDENTIALS} is malformed") from None
    return data


def _check_certificate(ca_pem: bytes, cert_pem: bytes, tls_key_pem: bytes) -> None:
    """The client certificate must come from the pinned CA and hold our TLS public key."""
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(tls_key_pem, password=None)
    except ValueError:
        raise TamperedError("CA, certificate or key in the state dir does not parse") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as e:  # noqa: BLE001 - InvalidSignature et al.
        raise TamperedError(
            f"client certificate is not issued by the pinned CA ({type(e).__name__})"
        ) from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if not hmac.compare_digest(
        cert.public_key().public_bytes(der, spki), key.public_key().public_bytes(der, spki)
    ):
        raise TamperedError("client certificate does not match the appliance's TLS key")


def ensure_run_dir(state: AgentState) -> Path:
    """Create (0700) and return the run directory."""
    state.run_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(state.run_dir, 0o700)
    return state.run_dir
