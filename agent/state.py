"""The appliance's activation state: a 0700 directory of 0600 files, bound to the appliance.

Layout (version 2; version 1 is the same with a file keystore and no ``keystore`` entry)::

    STATE_DIR/               0700
      state.json             {"version": 2, "platform_url": ..., "appliance": ...,
                              "keystore": {"kind": "tpm", "tcti": ..., "pcrs": [...], ...},
                              "proxy": {"url": "http://HOST:PORT", "credentials": bool}}
      ca.pem                 the platform's root CA (the only trust anchor)
      client-cert.pem        this appliance's TLS client certificate (issued by that CA)
      <secrets>              held by the keystore (agent.keystore), by name:
                               client-key.pem       the P-256 TLS private key (PKCS#8 PEM)
                               seal-key.bin         the raw 32-byte X25519 key (v1 sealed blobs)
                               seal-key-hybrid.bin  the 96-byte ML-KEM-768 seed + X25519 key
                                                    (v2 HPKE blobs); at activation, or later by
                                                    `scanner-agent seal-key upgrade`
                               proxy-credentials    "user:password" for the CONNECT proxy
                                                    (only when the proxy needs them)
                             tpm keystore: NAME.tpm envelopes + tpm-kek.pub/.priv (TPM-sealed)
                             file keystore: NAME in clear, plus boot-counter
      binding.mac            hex HMAC-SHA256 over the files above (the commit marker)
      volume.img             the LUKS2 volume (created at first boot, not bound: it changes)
      run/                   mount points, pid files, logs of the children (0700)

Binding: ``binding.mac`` is HMAC-SHA256 under a key derived (HKDF-SHA256) from both private
keys (TLS and X25519), over the length-prefixed names and contents of state.json, ca.pem and
client-cert.pem, and over the proxy credentials (as unwrapped from the keystore) when
state.json says there are some. The hybrid key is not part of the binding so that an
existing appliance can add it without rewriting the commit marker; swapping it can only
make blobs fail to open, since the platform learns the hybrid public key over mutual TLS,
never from this file. Only the holder of the appliance's private keys can produce the
binding, so an edited platform URL, an edited or removed proxy, a swapped CA or a changed
keystore entry (e.g. ``tpm`` turned into ``file``) is refused at start. On top of that,
the client certificate must be issued by the pinned CA and carry the public key of the TLS
key. Nothing reads the platform URL, the proxy or the CA from flags, environment variables
or other files.

The outbound proxy (optional) is fixed at activation: ``state.json`` holds its URL (the
``proxy`` entry is absent without a proxy, so states activated before proxies existed
verify unchanged); its credentials are an appliance secret like the private keys, held by
the keystore (TPM-wrapped with the tpm keystore, never in clear on disk) and read and
written only by `load_proxy_credentials` / `store_proxy_credentials`. A version 1 state
dir may carry a proxy too: its file keystore keeps the credentials in the clear
``proxy-credentials`` file, the layout such dirs were written with.
"""

from __future__ import annotations

import hmac
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.errors import StateError, TamperedError
from agent.keystore import Keystore, open_keystore
from agent.keystore.base import write_new
from protocol import sealing
from protocol.proxy import ProxyConfig, check_credentials
from scratchfs.keyholder.wipe import wipe

STATE_VERSION: Final = 2
LEGACY_VERSION: Final = 1  # before keystores: secrets in clear files, no "keystore" entry
STATE_JSON: Final = "state.json"
CA_PEM: Final = "ca.pem"
CERT_PEM: Final = "client-cert.pem"
KEY_PEM: Final = "client-key.pem"
SEAL_KEY: Final = "seal-key.bin"
SEAL_KEY_HYBRID: Final = "seal-key-hybrid.bin"
BINDING: Final = "binding.mac"
PROXY_CREDENTIALS: Final = "proxy-credentials"  # a keystore secret name
MAX_PROXY_CREDENTIALS: Final = 1024  # bytes of "user:password"
VOLUME_IMAGE: Final = "volume.img"
RUN_DIR: Final = "run"
BOUND_FILES: Final = (STATE_JSON, CA_PEM, CERT_PEM)
SECRET_NAMES: Final = (KEY_PEM, SEAL_KEY)
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
        keystore: Keystore,
        tls_key_pem: bytearray,
        seal_private: bytearray,
        hybrid_private: bytearray | None = None,
        proxy: ProxyConfig | None = None,
    ) -> None:
        self.root = root
        self.endpoint = endpoint
        self.appliance = appliance
        self.ca_pem = ca_pem
        self.cert_pem = cert_pem
        self.keystore = keystore
        self._tls_key_pem = tls_key_pem
        self._seal_private = seal_private
        self._hybrid_private = hybrid_private
        self.proxy = proxy  # every platform and syslog connection goes through it when set

    def __repr__(self) -> str:
        return (
            f"<AgentState root={str(self.root)!r} appliance={self.appliance!r} "
            f"keystore={self.keystore.kind}>"
        )

    def tls_key_pem(self) -> bytearray:
        """The TLS private key (PEM), for building the mTLS context; do not keep a reference."""
        if not any(self._tls_key_pem):
            raise StateError("the TLS key was already forgotten", "restart the agent")
        return self._tls_key_pem

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

    def forget_tls_key(self) -> None:
        """Overwrite the in-memory TLS key once OpenSSL holds its own copy."""
        wipe(self._tls_key_pem)

    @property
    def has_hybrid_key(self) -> bool:
        """Whether this appliance holds a hybrid (sealing v2) key."""
        return self._hybrid_private is not None

    def sealing_publics(self) -> tuple[bytes, bytes]:
        """The X25519 and hybrid (empty without one) public keys, as the platform records them."""
        hybrid = b"" if self._hybrid_private is None else sealing.hybrid_public_from_private(self._hybrid_private)
        return sealing.public_from_private(bytes(self.seal_private())), hybrid

    def open_sealed(self, sealed: bytes, context: bytes) -> bytearray:
        """Open a v1 or v2 blob with whichever key it needs; the caller wipes the result.

        Raise sealing.SealError (one line, says what to do) when it does not open.
        """
        return sealing.open_any(self.seal_private(), self._hybrid_private, sealed, context)

    def forget(self) -> None:
        """Overwrite the in-memory secrets and let the keystore forget its wrapping key.

        Clients built from this state share its proxy credentials: call this only once
        they are done.
        """
        wipe(self._seal_private)
        wipe(self._tls_key_pem)
        if self._hybrid_private is not None:
            wipe(self._hybrid_private)
        if self.proxy is not None and isinstance(self.proxy.credentials, bytearray):
            wipe(self.proxy.credentials)
        self.keystore.close()


# --- writing ---------------------------------------------------------------------------


def _binding_key(tls_key_pem: bytes | bytearray, seal_private: bytes | bytearray) -> bytes:
    key = serialization.load_pem_private_key(bytes(tls_key_pem), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TamperedError(f"{KEY_PEM} is not an EC private key")
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    return HKDF(hashes.SHA256(), 32, salt=None, info=_BINDING_INFO).derive(
        scalar + bytes(seal_private)
    )


def _binding_mac(key: bytes, contents: dict[str, bytes | bytearray]) -> str:
    mac = hmac.new(key, digestmod="sha256")
    # The proxy credentials are bound only when present, so that the MAC of a state without
    # a proxy is what it always was.
    names = (*BOUND_FILES, PROXY_CREDENTIALS) if PROXY_CREDENTIALS in contents else BOUND_FILES
    for name in names:
        data = contents[name]
        mac.update(len(name).to_bytes(2, "big") + name.encode())
        mac.update(len(data).to_bytes(8, "big"))
        mac.update(data)  # separately: concatenating would copy a secret into unwipeable bytes
    return mac.hexdigest()


def write_state(
    root: Path,
    endpoint: PlatformEndpoint,
    appliance: str,
    ca_pem: bytes,
    cert_pem: bytes,
    tls_key_pem: bytes | bytearray,
    seal_private: bytes | bytearray,
    activated_at: float,
    keystore: Keystore,
    hybrid_private: bytes | bytearray | None = None,
    proxy: ProxyConfig | None = None,
    volume_shares: Mapping[str, bytes | bytearray] | None = None,
) -> None:
    """Create the state directory (must be absent or empty) and bind it; binding.mac last.

    The secrets go through *keystore* (created for *root*): any secret stored there by name
    is covered, whatever the backend; that includes *proxy*'s credentials. *volume_shares*
    (a keystore migration) are the appliance's volume-key shares by name, stored before
    binding.mac so that a staged state that is complete has them too.
    """
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
        "keystore": keystore.config(),
    }
    if proxy is not None:
        doc["proxy"] = {"url": proxy.url, "credentials": proxy.credentials is not None}
    contents: dict[str, bytes | bytearray] = {
        STATE_JSON: (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(),
        CA_PEM: ca_pem,
        CERT_PEM: cert_pem,
    }
    for name, data in contents.items():
        write_new(root / name, data)
    keystore.persist()
    keystore.store(KEY_PEM, tls_key_pem)
    keystore.store(SEAL_KEY, seal_private)
    if hybrid_private is not None:
        keystore.store(SEAL_KEY_HYBRID, hybrid_private)
    if proxy is not None and proxy.credentials is not None:
        store_proxy_credentials(keystore, proxy.credentials)
        contents[PROXY_CREDENTIALS] = proxy.credentials
    for name, share in (volume_shares or {}).items():
        keystore.store(name, share)
    mac = _binding_mac(_binding_key(tls_key_pem, seal_private), contents)
    write_new(root / BINDING, (mac + "\n").encode())
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


def _read_doc(root: Path) -> tuple[bytes, dict[str, Any]]:
    raw = (root / STATE_JSON).read_bytes()
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise TamperedError(f"{STATE_JSON} is malformed ({e})") from None
    if doc.get("version") not in (STATE_VERSION, LEGACY_VERSION):
        raise TamperedError(f"unsupported state version {doc.get('version')!r}")
    if doc.get("version") == LEGACY_VERSION and "keystore" in doc:
        raise TamperedError(f"{STATE_JSON} version 1 cannot name a keystore")
    if doc.get("proxy") is not None and not isinstance(doc["proxy"], dict):
        raise TamperedError(f"{STATE_JSON} has a malformed proxy entry")
    return raw, doc


def unverified_doc(root: Path) -> dict[str, Any]:
    """state.json as written, NOT verified (its MAC needs the keys): only for reporting a boot
    whose keystore refused to unlock (agent.boot_report), where nothing read here guards a secret."""
    return _read_doc(root)[1]


def load_state(root: Path, tcti: str | None = None) -> AgentState:
    """Load and verify a state dir; raise StateError or TamperedError (one-line messages).

    The keystore named in state.json is opened (with *tcti* instead of the recorded TCTI
    when given) before the binding is checked: the binding key comes from the secrets it
    holds, and the check then covers the keystore entry itself.
    """
    if not root.is_dir():
        raise StateError(f"state dir {root} does not exist")
    if not (root / STATE_JSON).exists():
        raise StateError(f"state dir {root} holds no activation ({STATE_JSON} missing)")
    _check_mode(root, 0o700, is_dir=True)
    for name in (*BOUND_FILES, BINDING):
        if not (root / name).exists():
            raise TamperedError(f"state dir {root} is incomplete (missing {name})")
        _check_mode(root / name, 0o600, is_dir=False)
    raw, doc = _read_doc(root)
    keystore = open_keystore(root, doc.get("keystore"), tcti)
    try:
        return _load_with(root, raw, doc, keystore)
    except BaseException:
        keystore.close()
        raise


def _load_with(root: Path, raw: bytes, doc: dict[str, Any], keystore: Keystore) -> AgentState:
    missing = [n for n in keystore.files(SECRET_NAMES) if not (root / n).exists()]
    if missing:
        raise TamperedError(f"state dir {root} is incomplete (missing {', '.join(missing)})")
    for name in keystore.files(SECRET_NAMES):
        _check_mode(root / name, 0o600, is_dir=False)
    ca_pem = (root / CA_PEM).read_bytes()
    cert_pem = (root / CERT_PEM).read_bytes()
    contents: dict[str, bytes | bytearray] = {STATE_JSON: raw, CA_PEM: ca_pem, CERT_PEM: cert_pem}
    # The (not yet verified) proxy entry decides whether the MAC covers credentials; the
    # MAC check below then covers the entry itself.
    proxy_doc: dict[str, Any] | None = doc.get("proxy")
    if proxy_doc is None and keystore.exists(PROXY_CREDENTIALS):
        raise TamperedError(f"state dir {root} holds {PROXY_CREDENTIALS} but no proxy needs them")
    credentials: bytearray | None = None
    tls_key_pem = bytearray()
    seal_private = bytearray()
    try:
        if proxy_doc is not None and proxy_doc.get("credentials") is True:
            credentials = load_proxy_credentials(keystore)
            contents[PROXY_CREDENTIALS] = credentials
        elif keystore.exists(PROXY_CREDENTIALS):
            raise TamperedError(
                f"state dir {root} holds {PROXY_CREDENTIALS} but the proxy needs none"
            )
        tls_key_pem = keystore.load(KEY_PEM)
        seal_private = keystore.load(SEAL_KEY)
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
            endpoint = PlatformEndpoint.parse(str(doc["platform_url"]))
            appliance = str(doc["appliance"])
            proxy = None
            if proxy_doc is not None:
                proxy = ProxyConfig.parse(str(proxy_doc["url"]), credentials)
        except (ValueError, KeyError, TypeError) as e:
            raise TamperedError(f"{STATE_JSON} is malformed ({e})") from None
        _check_certificate(ca_pem, cert_pem, tls_key_pem)
        hybrid = load_hybrid_key(keystore)
    except BaseException:
        wipe(tls_key_pem)
        wipe(seal_private)
        if credentials is not None:
            wipe(credentials)
        raise
    keystore.lock()  # the wrapping key is not kept for the run: only what was unwrapped
    return AgentState(
        root, endpoint, appliance, ca_pem, cert_pem, keystore, tls_key_pem, seal_private,
        hybrid, proxy,
    )


def load_hybrid_key(keystore: Keystore) -> bytearray | None:
    """The hybrid sealing private key, or None for an appliance not upgraded yet."""
    if not keystore.exists(SEAL_KEY_HYBRID):
        return None
    for name in keystore.files((SEAL_KEY_HYBRID,)):
        _check_mode(keystore.root / name, 0o600, is_dir=False)
    key = keystore.load(SEAL_KEY_HYBRID)
    if len(key) != sealing.HYBRID_PRIVATE_LEN:
        wipe(key)
        raise TamperedError(
            f"{SEAL_KEY_HYBRID} is not a {sealing.HYBRID_PRIVATE_LEN}-byte hybrid key"
        )
    return key


def store_hybrid_key(keystore: Keystore, private: bytes | bytearray) -> None:
    """Add the hybrid key to an activated state dir, through its keystore (atomic).

    Refuses to replace an existing one: blobs sealed to it would become unreadable.
    """
    if keystore.exists(SEAL_KEY_HYBRID):
        raise StateError(f"{SEAL_KEY_HYBRID} exists already", "keep it; nothing to upgrade")
    keystore.store(SEAL_KEY_HYBRID, private)


def store_proxy_credentials(keystore: Keystore, credentials: bytes | bytearray) -> None:
    """Keep the proxy's "user:password" like the other appliance secrets (in the keystore)."""
    keystore.store(PROXY_CREDENTIALS, credentials)


def load_proxy_credentials(keystore: Keystore) -> bytearray:
    """The proxy's "user:password" (the caller wipes it); TamperedError when missing or
    malformed, StateError when its file has unsafe permissions."""
    if not keystore.exists(PROXY_CREDENTIALS):
        raise TamperedError(
            f"state dir {keystore.root} is incomplete (missing {PROXY_CREDENTIALS})"
        )
    for name in keystore.files((PROXY_CREDENTIALS,)):
        _check_mode(keystore.root / name, 0o600, is_dir=False)
    data = keystore.load(PROXY_CREDENTIALS)
    try:
        if len(data) > MAX_PROXY_CREDENTIALS:
            raise ValueError("too long")
        check_credentials(data)
    except ValueError:
        wipe(data)
        raise TamperedError(f"{PROXY_CREDENTIALS} is malformed") from None
    return data


def _check_certificate(ca_pem: bytes, cert_pem: bytes, tls_key_pem: bytes | bytearray) -> None:
    """The client certificate must come from the pinned CA and hold our TLS public key."""
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(bytes(tls_key_pem), password=None)
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
