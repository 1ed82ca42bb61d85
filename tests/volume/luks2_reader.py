"""An independent LUKS2 reader, written from the LUKS2 on-disk format specification.

It shares no code with scratchfs.volume: header parsing, checksum, PBKDF2 keyslot unlock,
anti-forensic merge, digest check and data decryption are all done here, so that a test can
show that what our engine writes is what the specification says. Supports what our volumes
use: pbkdf2 keyslots, luks1 AF with sha256/sha1, aes-xts-plain64 keyslot areas and segments.
"""

from __future__ import annotations

import base64
import hmac
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

MAGIC_1ST = b"LUKS\xba\xbe"
MAGIC_2ND = b"SKUL\xba\xbe"
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"sha256": hashes.SHA256, "sha1": hashes.SHA1, "sha512": hashes.SHA512}


@dataclass
class Header:
    seqid: int
    hdr_size: int
    meta: dict[str, Any]


def parse_header(blob: bytes, offset: int) -> Header:
    """Parse and verify one header copy at *offset* (binary header + JSON area)."""
    fmt = ">6sHQQ48s32s64s40s48sQ184s64s"
    (magic, version, hdr_size, seqid, _label, csum_alg, _salt, _uuid, _subsys, hdr_offset, _pad,
     csum) = struct.unpack_from(fmt, blob, offset)
    if magic not in (MAGIC_1ST, MAGIC_2ND) or version != 2:
        raise ValueError("not a LUKS2 header")
    if hdr_offset != offset:
        raise ValueError("header offset mismatch")
    area = bytearray(blob[offset:offset + hdr_size])
    csum_off = struct.calcsize(">6sHQQ48s32s64s40s48sQ184s")
    area[csum_off:csum_off + 64] = bytes(64)
    alg = csum_alg.rstrip(b"\0").decode()
    h = hashes.Hash(_HASHES[alg]())
    h.update(bytes(area))
    digest = h.finalize()
    if not hmac.compare_digest(digest, csum[:len(digest)]):
        raise ValueError("header checksum mismatch")
    json_text = blob[offset + 4096:offset + hdr_size].split(b"\0", 1)[0]
    return Header(seqid, hdr_size, json.loads(json_text))


def read_header(blob: bytes) -> Header:
    """The valid header copy with the highest seqid (primary at 0, secondary after it)."""
    candidates = []
    try:
        primary = parse_header(blob, 0)
        candidates.append(primary)
        secondary_at = primary.hdr_size
    except ValueError:
        secondary_at = None
    offsets = [secondary_at] if secondary_at else [16384 << i for i in range(9)]
    for off in offsets:
        try:
            candidates.append(parse_header(blob, off))
            break
        except (ValueError, struct.error):
            continue
    if not candidates:
        raise ValueError("no valid LUKS2 header")
    return max(candidates, key=lambda h: h.seqid)


def _b64(s: str) -> bytes:
    return base64.b64decode(s)


def _pbkdf2(hash_name: str, secret: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    return PBKDF2HMAC(_HASHES[hash_name](), length, salt, iterations).derive(secret)


def xts_plain64(key: bytes, data: bytes, sector_size: int, first_iv: int, iv_step: int, decrypt: bool) -> bytes:
    """aes-xts-plain64 over *data*, sector by sector; IV i = first_iv + i*iv_step."""
    out = []
    for i in range(0, len(data), sector_size):
        iv = (first_iv + (i // sector_size) * iv_step).to_bytes(8, "little") + bytes(8)
        c = Cipher(algorithms.AES(key), modes.XTS(iv))
        ctx = c.decryptor() if decrypt else c.encryptor()
        out.append(ctx.update(data[i:i + sector_size]) + ctx.finalize())
    return b"".join(out)


def _diffuse(data: bytes, hash_name: str) -> bytes:
    """The LUKS anti-forensic diffuser: hash each digest-sized block with its index."""
    size = int(_HASHES[hash_name]().digest_size)
    out = []
    for i in range(0, len(data), size):
        block = data[i:i + size]
        h = hashes.Hash(_HASHES[hash_name]())
        h.update(struct.pack(">I", i // size) + block)
        out.append(h.finalize()[:len(block)])
    return b"".join(out)


def af_merge(material: bytes, key_size: int, stripes: int, hash_name: str) -> bytes:
    d = bytes(key_size)
    for i in range(stripes - 1):
        stripe = material[i * key_size:(i + 1) * key_size]
        d = _diffuse(bytes(a ^ b for a, b in zip(d, stripe, strict=True)), hash_name)
    last = material[(stripes - 1) * key_size:stripes * key_size]
    return bytes(a ^ b for a, b in zip(d, last, strict=True))


def unlock(blob: bytes, passphrase: bytes) -> tuple[bytes, Header]:
    """Volume master key of the first keyslot that *passphrase* opens (digest verified)."""
    hdr = read_header(blob)
    for _slot, ks in sorted(hdr.meta["keyslots"].items()):
        kdf, af, area = ks["kdf"], ks["af"], ks["area"]
        if kdf["type"] != "pbkdf2" or area["encryption"] != "aes-xts-plain64":
            continue
        key_size = int(ks["key_size"])
        slot_key = _pbkdf2(kdf["hash"], passphrase, _b64(kdf["salt"]), kdf["iterations"], int(area["key_size"]))
        length = key_size * af["stripes"]
        length += -length % 512
        raw = blob[int(area["offset"]):int(area["offset"]) + length]
        material = xts_plain64(slot_key, raw, 512, 0, 1, decrypt=True)
        candidate = af_merge(material, key_size, af["stripes"], af["hash"])
        for digest in hdr.meta["digests"].values():
            if _slot not in digest["keyslots"]:
                continue
            want = _b64(digest["digest"])
            got = _pbkdf2(digest["hash"], candidate, _b64(digest["salt"]), digest["iterations"], len(want))
            if hmac.compare_digest(got, want):
                return candidate, hdr
    raise PermissionError("no keyslot opens with this passphrase")


def decrypt_segment(blob: bytes, passphrase: bytes) -> bytes:
    """The plaintext of the (single) data segment."""
    master_key, hdr = unlock(blob, passphrase)
    (seg,) = hdr.meta["segments"].values()
    assert seg["encryption"] == "aes-xts-plain64", seg
    offset = int(seg["offset"])
    size = len(blob) - offset if seg["size"] == "dynamic" else int(seg["size"])
    sector = int(seg["sector_size"])
    size -= size % sector
    return xts_plain64(master_key, blob[offset:offset + size], sector, int(seg["iv_tweak"]), sector // 512, True)


def rewrite_metadata(path: Path, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Apply *mutate* to the JSON metadata of both header copies of *path* and re-checksum them.

    For crafting hostile headers that libcryptsetup still loads (the checksum is valid), as an
    attacker with write access to the image would.
    """
    blob = bytearray(path.read_bytes())
    first = parse_header(bytes(blob), 0)
    csum_off = struct.calcsize(">6sHQQ48s32s64s40s48sQ184s")
    for offset in (0, first.hdr_size):
        hdr = parse_header(bytes(blob), offset)
        mutate(hdr.meta)
        text = json.dumps(hdr.meta).encode()
        room = hdr.hdr_size - 4096
        assert len(text) < room, "mutated metadata does not fit the JSON area"
        blob[offset + 4096:offset + hdr.hdr_size] = text + bytes(room - len(text))
        blob[offset + csum_off:offset + csum_off + 64] = bytes(64)
        h = hashes.Hash(hashes.SHA256())
        h.update(bytes(blob[offset:offset + hdr.hdr_size]))
        blob[offset + csum_off:offset + csum_off + 32] = h.finalize()
    path.write_bytes(bytes(blob))
