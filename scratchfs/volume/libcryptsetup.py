"""ctypes binding to libcryptsetup.so.12: every LUKS2 header, keyslot and key operation.

We never parse or write LUKS2 metadata ourselves for real work: libcryptsetup (the reference
implementation) does it, including the two header copies with sequence ids that make header
updates crash-safe. None of the calls used here needs device-mapper, so they work on a plain
image file.

Secrets (keyslot passphrases, volume master keys) are passed as ctypes views of caller-owned ``bytearray``
objects, so the caller can zero them; nothing here logs or formats them. libcryptsetup's own
messages are collected through a log callback (they never contain keys) and used for errors;
its debug output is never enabled.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchfs.keyholder.wipe import wipe
from scratchfs.volume.errors import (
    BadImageError,
    ErasedError,
    ImageAccessError,
    VolumeError,
    WrongKeyError,
)
from scratchfs.volume.unlock_bounds import check_unlock_cost

log = logging.getLogger(__name__)

LIBRARY = "libcryptsetup.so.12"
CRYPT_LUKS2 = b"LUKS2"
CRYPT_ANY_SLOT = -1
CRYPT_LOG_ERROR = 1
CRYPT_PBKDF_NO_BENCHMARK = 1 << 1
CRYPT_FLAGS_REQUIREMENTS = 1

# crypt_keyslot_info
SLOT_INVALID, SLOT_INACTIVE, SLOT_ACTIVE, SLOT_ACTIVE_LAST, SLOT_UNBOUND = range(5)


class _PbkdfType(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_char_p),
        ("hash", ctypes.c_char_p),
        ("time_ms", ctypes.c_uint32),
        ("iterations", ctypes.c_uint32),
        ("max_memory_kb", ctypes.c_uint32),
        ("parallel_threads", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


class _ParamsLuks2(ctypes.Structure):
    _fields_ = [
        ("pbkdf", ctypes.POINTER(_PbkdfType)),
        ("integrity", ctypes.c_char_p),
        ("integrity_params", ctypes.c_void_p),
        ("data_alignment", ctypes.c_size_t),
        ("data_device", ctypes.c_char_p),
        ("sector_size", ctypes.c_uint32),
        ("label", ctypes.c_char_p),
        ("subsystem", ctypes.c_char_p),
    ]


_LogFunc = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

_lib_lock = threading.Lock()
_lib_handle: ctypes.CDLL | None = None
# Messages of the call in progress, per thread (the callback runs synchronously in the caller).
_messages = threading.local()


def _on_log(level: int, msg: bytes | None, _usrptr: int | None) -> None:
    # Only keep error-level text for error reporting; libcryptsetup never puts keys in messages.
    if msg is None or level != CRYPT_LOG_ERROR:
        return
    bucket: list[str] | None = getattr(_messages, "bucket", None)
    if bucket is not None:
        bucket.append(msg.decode("utf-8", "replace").strip())


_log_callback = _LogFunc(_on_log)  # module-lifetime reference: the C library keeps the pointer


def _sig(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> None:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


def lib() -> ctypes.CDLL:
    """Load libcryptsetup once and declare the signatures we use."""
    global _lib_handle
    with _lib_lock:
        if _lib_handle is not None:
            return _lib_handle
        try:
            h = ctypes.CDLL(LIBRARY, use_errno=True)
        except OSError as e:
            raise VolumeError(
                f"cannot load {LIBRARY} ({e.strerror or e}); install the libcryptsetup12 package"
            ) from None
        vp, cp, i, u32, u64, sz = (
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_uint32,
            ctypes.c_uint64,
            ctypes.c_size_t,
        )
        pp = ctypes.POINTER(ctypes.c_void_p)
        _sig(h, "crypt_init", i, pp, cp)
        _sig(h, "crypt_free", None, vp)
        _sig(h, "crypt_set_log_callback", None, vp, _LogFunc, vp)
        _sig(h, "crypt_set_debug_level", None, i)
        _sig(h, "crypt_set_pbkdf_type", i, vp, ctypes.POINTER(_PbkdfType))
        _sig(h, "crypt_set_metadata_size", i, vp, u64, u64)
        _sig(h, "crypt_get_metadata_size", i, vp, ctypes.POINTER(u64), ctypes.POINTER(u64))
        _sig(h, "crypt_format", i, vp, cp, cp, cp, cp, vp, sz, vp)
        _sig(h, "crypt_load", i, vp, cp, vp)
        _sig(h, "crypt_keyslot_add_by_volume_key", i, vp, i, vp, sz, vp, sz)
        _sig(h, "crypt_volume_key_get", i, vp, i, vp, ctypes.POINTER(sz), vp, sz)
        _sig(h, "crypt_keyslot_destroy", i, vp, i)
        _sig(h, "crypt_keyslot_status", i, vp, i)
        _sig(h, "crypt_keyslot_max", i, cp)
        _sig(h, "crypt_get_type", cp, vp)
        _sig(h, "crypt_get_cipher", cp, vp)
        _sig(h, "crypt_get_cipher_mode", cp, vp)
        _sig(h, "crypt_get_uuid", cp, vp)
        _sig(h, "crypt_get_label", cp, vp)
        _sig(h, "crypt_get_data_offset", u64, vp)
        _sig(h, "crypt_get_iv_offset", u64, vp)
        _sig(h, "crypt_get_volume_key_size", i, vp)
        _sig(h, "crypt_get_sector_size", i, vp)
        _sig(h, "crypt_dump_json", i, vp, ctypes.POINTER(cp), u32)
        _sig(h, "crypt_persistent_flags_get", i, vp, i, ctypes.POINTER(u32))
        # Silence the library's default stderr logger for handles we have not created yet.
        h.crypt_set_log_callback(None, _log_callback, None)
        h.crypt_set_debug_level(0)
        _lib_handle = h
        return h


@contextmanager
def _collect() -> Iterator[list[str]]:
    bucket: list[str] = []
    previous = getattr(_messages, "bucket", None)
    _messages.bucket = bucket
    try:
        yield bucket
    finally:
        _messages.bucket = previous


def _view(secret: bytes | bytearray) -> ctypes.Array[ctypes.c_char]:
    """A ctypes view on a bytearray (no copy), or a copy of immutable bytes."""
    if isinstance(secret, bytearray):
        return (ctypes.c_char * len(secret)).from_buffer(secret)
    return ctypes.create_string_buffer(bytes(secret), len(secret))


def _detail(messages: list[str], rc: int) -> str:
    if messages:
        return messages[-1].rstrip(".")
    return errno.errorcode.get(-rc, f"error {rc}")


def _luks_version(image: Path) -> int | None:
    """The version field of a LUKS header at the start of *image*, if there is one."""
    try:
        with open(image, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    if len(head) == 8 and head[:6] == b"LUKS\xba\xbe":
        return int.from_bytes(head[6:8], "big")
    return None


@dataclass(frozen=True)
class Pbkdf:
    """Keyslot KDF parameters for new keyslots."""

    kdf: str = "pbkdf2"
    hash: str = "sha256"
    iterations: int = 1000


@dataclass(frozen=True)
class SegmentInfo:
    """What the userspace data path needs to know about the (single) data segment."""

    cipher: str
    cipher_mode: str
    master_key_size: int  # bytes of the volume master key (LUKS calls it the volume key)
    sector_size: int
    data_offset: int  # bytes from the start of the image
    iv_offset: int  # in 512-byte units, added to every sector's IV
    size: int | None  # bytes, or None for "dynamic" (to the end of the image)


class CryptDevice:
    """One libcryptsetup context on an image file (``crypt_init`` ... ``crypt_free``)."""

    def __init__(self, image: Path) -> None:
        self.image = image
        self._lib = lib()
        try:
            # libcryptsetup reports an unreadable file as a bare EIO; say what it is.
            os.close(os.open(image, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as e:
            raise ImageAccessError(f"cannot open {image}: {e.strerror}; check the path and permissions") from None
        handle = ctypes.c_void_p()
        with _collect() as msgs:
            rc = self._lib.crypt_init(ctypes.byref(handle), str(image).encode())
        if rc < 0:
            raise ImageAccessError(
                f"cannot open {image}: {_detail(msgs, rc)}; check that the image exists and is readable"
            )
        self._cd: int | None = handle.value
        self._lib.crypt_set_log_callback(self._cd, _log_callback, None)

    def close(self) -> None:
        """Free the context (libcryptsetup wipes its copy of any volume master key)."""
        if self._cd is not None:
            self._lib.crypt_free(self._cd)
            self._cd = None

    def __enter__(self) -> CryptDevice:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CryptDevice image={str(self.image)!r} open={self._cd is not None}>"

    @property
    def cd(self) -> int:
        if self._cd is None:
            raise VolumeError("libcryptsetup context already closed")
        return self._cd

    # -- creating ---------------------------------------------------------------------------

    def format_luks2(
        self,
        *,
        cipher: str = "aes",
        cipher_mode: str = "xts-plain64",
        master_key_size: int = 64,
        sector_size: int = 4096,
        pbkdf: Pbkdf | None = None,
        metadata_size: int = 16384,
        keyslots_size: int = 1024 * 1024 - 2 * 16384,
        data_alignment_bytes: int = 1024 * 1024,
        label: str | None = None,
    ) -> None:
        """Write a fresh LUKS2 header; the volume master key is generated by libcryptsetup."""
        pb = pbkdf or Pbkdf()
        pbkdf_struct = _PbkdfType(pb.kdf.encode(), pb.hash.encode(), 0, pb.iterations, 0, 0, CRYPT_PBKDF_NO_BENCHMARK)
        params = _ParamsLuks2(
            ctypes.pointer(pbkdf_struct),
            None,
            None,
            data_alignment_bytes // 512,
            None,
            sector_size,
            label.encode() if label else None,
            None,
        )
        with _collect() as msgs:
            rc = self._lib.crypt_set_metadata_size(self.cd, metadata_size, keyslots_size)
            if rc >= 0:
                rc = self._lib.crypt_format(
                    self.cd,
                    CRYPT_LUKS2,
                    cipher.encode(),
                    cipher_mode.encode(),
                    None,
                    None,
                    master_key_size,
                    ctypes.byref(params),
                )
        if rc < 0:
            raise VolumeError(f"cannot format {self.image}: {_detail(msgs, rc)}")
        self.set_pbkdf(pb)

    def set_pbkdf(self, pb: Pbkdf) -> None:
        """Use *pb* (no benchmark) for keyslots added afterwards."""
        pbkdf_struct = _PbkdfType(pb.kdf.encode(), pb.hash.encode(), 0, pb.iterations, 0, 0, CRYPT_PBKDF_NO_BENCHMARK)
        with _collect() as msgs:
            rc = self._lib.crypt_set_pbkdf_type(self.cd, ctypes.byref(pbkdf_struct))
        if rc < 0:
            raise VolumeError(f"cannot set keyslot KDF on {self.image}: {_detail(msgs, rc)}")

    def add_keyslot(
        self,
        passphrase: bytes | bytearray,
        master_key: bytes | bytearray | None = None,
        slot: int = CRYPT_ANY_SLOT,
        pbkdf: Pbkdf | None = None,
    ) -> int:
        """Add a keyslot for *passphrase*; *master_key* None means the volume master key made by format.

        The keyslot KDF is *pbkdf* (default PBKDF2, 1000 iterations, no benchmark): our
        passphrases are 256 random bits, see docs/volume.md. Set explicitly every time so that
        a loaded header never falls back to libcryptsetup's benchmarked argon2id.
        """
        self.set_pbkdf(pbkdf or Pbkdf())
        pw = _view(passphrase)
        mk = _view(master_key) if master_key is not None else None
        with _collect() as msgs:
            rc = self._lib.crypt_keyslot_add_by_volume_key(
                self.cd,
                slot,
                mk,
                len(master_key) if master_key is not None else 0,
                pw,
                len(passphrase),
            )
        if rc < 0:
            raise VolumeError(f"cannot add a keyslot to {self.image}: {_detail(msgs, rc)}")
        return int(rc)

    # -- reading ----------------------------------------------------------------------------

    def load(self) -> None:
        """Read and verify the LUKS2 header (either copy); refuse anything else."""
        with _collect() as msgs:
            rc = self._lib.crypt_load(self.cd, CRYPT_LUKS2, None)
        if rc < 0:
            if _luks_version(self.image) == 1:
                raise BadImageError(
                    f"{self.image} is a LUKS1 volume, only LUKS2 is supported; "
                    "convert it with 'cryptsetup convert --type luks2'"
                )
            if rc == -errno.EINVAL and not msgs:
                detail = "no valid LUKS2 header in either copy"
            elif rc == -errno.EIO and not msgs:
                detail = "too short or unreadable for a LUKS2 header"
            else:
                detail = _detail(msgs, rc)
            raise BadImageError(
                f"{self.image} is not a usable LUKS2 volume ({detail}); "
                "check the path, or restore the image from a backup"
            )
        flags = ctypes.c_uint32(0)
        rc = self._lib.crypt_persistent_flags_get(self.cd, CRYPT_FLAGS_REQUIREMENTS, ctypes.byref(flags))
        if rc < 0 or flags.value:
            raise BadImageError(
                f"{self.image} has unfinished reencryption or unknown requirements "
                f"(flags {flags.value:#x}); finish it with cryptsetup first"
            )

    def master_key(self, passphrase: bytes | bytearray, slot: int = CRYPT_ANY_SLOT) -> tuple[int, bytearray]:
        """Unlock with the keyslot *passphrase*: (keyslot, volume master key). The caller wipes it.

        Refuses (BadImageError) a header whose keyslots would make the derivation unbounded,
        before deriving anything (scratchfs.volume.unlock_bounds).
        """
        check_unlock_cost(self.image, self.dump_json())
        size = self.master_key_size()
        buf = bytearray(size)
        out = (ctypes.c_char * size).from_buffer(buf)
        out_size = ctypes.c_size_t(size)
        pw = _view(passphrase)
        with _collect() as msgs:
            rc = self._lib.crypt_volume_key_get(self.cd, slot, out, ctypes.byref(out_size), pw, len(passphrase))
        del out
        if rc < 0:
            wipe(buf)
            if not self.active_keyslots():
                raise ErasedError(
                    f"{self.image} has no keyslot left (it was erased); "
                    "its data cannot be recovered, format a new volume"
                )
            if rc == -errno.EPERM:
                raise WrongKeyError(
                    f"the key does not open {self.image} (no keyslot matches); "
                    "check that the platform sent this appliance's key"
                )
            raise BadImageError(f"cannot unlock {self.image}: {_detail(msgs, rc)}; check the image")
        return int(rc), buf

    def keyslot_max(self) -> int:
        """Number of keyslots LUKS2 supports."""
        return int(self._lib.crypt_keyslot_max(CRYPT_LUKS2))

    def keyslot_status(self, slot: int) -> int:
        """crypt_keyslot_info value of *slot*."""
        return int(self._lib.crypt_keyslot_status(self.cd, slot))

    def active_keyslots(self) -> list[int]:
        """Keyslots holding a key (bound or unbound)."""
        return [
            s
            for s in range(self.keyslot_max())
            if self.keyslot_status(s) in (SLOT_ACTIVE, SLOT_ACTIVE_LAST, SLOT_UNBOUND)
        ]

    def destroy_keyslot(self, slot: int) -> None:
        """Wipe one keyslot's key material and remove it from the header."""
        with _collect() as msgs:
            rc = self._lib.crypt_keyslot_destroy(self.cd, slot)
        if rc < 0:
            raise VolumeError(f"cannot destroy keyslot {slot} of {self.image}: {_detail(msgs, rc)}")

    def _str(self, fn: str) -> str:
        value = getattr(self._lib, fn)(self.cd)
        return value.decode() if value else ""

    def type(self) -> str:
        """Header type, e.g. 'LUKS2'."""
        return self._str("crypt_get_type")

    def cipher(self) -> str:
        """Data cipher, e.g. 'aes'."""
        return self._str("crypt_get_cipher")

    def cipher_mode(self) -> str:
        """Cipher mode with IV scheme, e.g. 'xts-plain64'."""
        return self._str("crypt_get_cipher_mode")

    def uuid(self) -> str:
        """Header UUID."""
        return self._str("crypt_get_uuid")

    def label(self) -> str:
        """Header label ('' if none)."""
        return self._str("crypt_get_label")

    def data_offset_sectors(self) -> int:
        """Start of the data segment in 512-byte sectors."""
        return int(self._lib.crypt_get_data_offset(self.cd))

    def iv_offset(self) -> int:
        """IV offset in 512-byte sectors."""
        return int(self._lib.crypt_get_iv_offset(self.cd))

    def master_key_size(self) -> int:
        """Volume master key length in bytes."""
        return int(self._lib.crypt_get_volume_key_size(self.cd))

    def sector_size(self) -> int:
        """Encryption sector size in bytes."""
        return int(self._lib.crypt_get_sector_size(self.cd))

    def metadata_size(self) -> tuple[int, int]:
        """(metadata area size, keyslots area size) in bytes."""
        m, k = ctypes.c_uint64(), ctypes.c_uint64()
        self._lib.crypt_get_metadata_size(self.cd, ctypes.byref(m), ctypes.byref(k))
        return int(m.value), int(k.value)

    def dump_json(self) -> dict[str, Any]:
        """The header's JSON metadata (holds salts and digests, never keys)."""
        out = ctypes.c_char_p()
        with _collect() as msgs:
            rc = self._lib.crypt_dump_json(self.cd, ctypes.byref(out), 0)
        if rc < 0 or out.value is None:
            raise BadImageError(f"cannot read metadata of {self.image}: {_detail(msgs, rc)}")
        parsed: dict[str, Any] = json.loads(out.value.decode())
        return parsed

    def segment(self) -> SegmentInfo:
        """Parameters of the single crypt data segment (refuses anything else)."""
        meta = self.dump_json()
        segments = meta.get("segments", {})
        if len(segments) != 1:
            raise BadImageError(
                f"{self.image} has {len(segments)} data segments; finish any reencryption with cryptsetup first"
            )
        seg = next(iter(segments.values()))
        if seg.get("type") != "crypt" or seg.get("integrity"):
            raise BadImageError(
                f"{self.image} uses an unsupported segment type ({seg.get('type')}, "
                f"integrity={bool(seg.get('integrity'))}); use aes-xts-plain64 without integrity"
            )
        raw_size = seg.get("size", "dynamic")
        return SegmentInfo(
            cipher=self.cipher(),
            cipher_mode=self.cipher_mode(),
            master_key_size=self.master_key_size(),
            sector_size=self.sector_size(),
            data_offset=self.data_offset_sectors() * 512,
            iv_offset=self.iv_offset(),
            size=None if raw_size == "dynamic" else int(raw_size),
        )


def open_loaded(image: Path) -> CryptDevice:
    """A context with *image*'s header loaded (raises BadImageError etc. on failure)."""
    dev = CryptDevice(image)
    try:
        dev.load()
    except BaseException:
        dev.close()
        raise
    return dev
