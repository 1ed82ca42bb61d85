"""How much work a LUKS2 header may ask of an unlock: checked before any key derivation.

The header is read from the image, so whoever can write the image chooses the keyslot KDF
parameters. Unchecked, PBKDF2 with 2^32-1 iterations or a keyslot key of megabytes (the
anti-forensic merge hashes key_size x 4000 bytes) keeps a booting appliance busy for hours,
and an argon2 memory cost of gigabytes lands in a process that mlocks its memory. So an
unlock only starts when the whole header's cost is below these caps; libcryptsetup tries every
active keyslot with a wrong key, hence budgets summed over the keyslots. The caps bound an
unlock on this project's reference machine (PBKDF2-SHA256 at ~4.3 M iterations/s, argon2id
at ~1 GiB-pass/s) to about 4 s of PBKDF2 plus about 8 s of argon2, and still admit what
`cryptsetup luksFormat` writes by default (one keyslot benchmarked to 2 s) and our own
volumes (PBKDF2, 1000 iterations).

Pure: takes the header's JSON metadata, touches nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scratchfs.volume.errors import BadImageError

__all__ = [
    "AF_STRIPES",
    "MAX_ARGON2_MEMORY_KIB",
    "MAX_ARGON2_THREADS",
    "MAX_ARGON2_WORK_KIB",
    "MAX_KEYSLOT_KEY_BYTES",
    "MAX_PBKDF2_ITERATIONS",
    "check_unlock_cost",
]

MAX_PBKDF2_ITERATIONS = 1 << 24  # summed over keyslots; ~4 s of PBKDF2-SHA256
MAX_ARGON2_MEMORY_KIB = 1 << 20  # 1 GiB per keyslot (cryptsetup's own default cap)
MAX_ARGON2_THREADS = 4  # cryptsetup's maximum
MAX_ARGON2_WORK_KIB = 8 << 20  # time cost x memory, summed over keyslots: 8 GiB-passes
MAX_KEYSLOT_KEY_BYTES = 64  # 512 bits: AES-256-XTS, the largest key a LUKS2 segment uses
AF_STRIPES = 4000  # the only value LUKS defines (and cryptsetup accepts)

_REFUSE = "restore the image from a backup or reformat it"


def _int(image: Path, slot: str, value: Any, what: str) -> int:
    # bool is an int in Python; a header saying `true` for a cost is as broken as a string.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadImageError(f"{image} keyslot {slot} has an invalid {what} ({value!r}); {_REFUSE}")
    return value


def _too_much(image: Path, slot: str, what: str, value: int, cap: int) -> BadImageError:
    return BadImageError(
        f"{image} keyslot {slot} asks for {what} {value}, more than the {cap} an unlock may take; {_REFUSE}"
    )


def check_unlock_cost(image: Path, meta: dict[str, Any]) -> None:
    """Raise BadImageError (exit 11) unless unlocking *image* is bounded; *meta* is its LUKS2 JSON."""
    pbkdf2_total = 0
    argon2_total = 0
    keyslots = meta.get("keyslots", {})
    if not isinstance(keyslots, dict):
        raise BadImageError(f"{image} has an invalid keyslots table; {_REFUSE}")
    for slot, ks in sorted(keyslots.items()):
        if not isinstance(ks, dict):
            raise BadImageError(f"{image} keyslot {slot} is not an object; {_REFUSE}")
        key_bytes = _int(image, slot, ks.get("key_size"), "key size")
        area = ks.get("area", {})
        area_key = _int(image, slot, area.get("key_size", 0) if isinstance(area, dict) else None, "area key size")
        for what, value in (("a key size of", key_bytes), ("an area key size of", area_key)):
            if value > MAX_KEYSLOT_KEY_BYTES:
                raise _too_much(image, slot, what, value, MAX_KEYSLOT_KEY_BYTES)
        af = ks.get("af", {})
        stripes = _int(image, slot, af.get("stripes") if isinstance(af, dict) else None, "AF stripe count")
        if stripes != AF_STRIPES:
            raise BadImageError(f"{image} keyslot {slot} has {stripes} AF stripes, not {AF_STRIPES}; {_REFUSE}")
        kdf = ks.get("kdf", {})
        kind = kdf.get("type") if isinstance(kdf, dict) else None
        if kind == "pbkdf2":
            pbkdf2_total += _int(image, slot, kdf.get("iterations"), "PBKDF2 iteration count")
            if pbkdf2_total > MAX_PBKDF2_ITERATIONS:
                raise _too_much(image, slot, "PBKDF2 iterations (all keyslots) of", pbkdf2_total, MAX_PBKDF2_ITERATIONS)
        elif kind in ("argon2i", "argon2id"):
            passes = _int(image, slot, kdf.get("time"), "argon2 time cost")
            memory = _int(image, slot, kdf.get("memory"), "argon2 memory cost")
            threads = _int(image, slot, kdf.get("cpus"), "argon2 thread count")
            if memory > MAX_ARGON2_MEMORY_KIB:
                raise _too_much(image, slot, "an argon2 memory cost (KiB) of", memory, MAX_ARGON2_MEMORY_KIB)
            if threads > MAX_ARGON2_THREADS:
                raise _too_much(image, slot, "argon2 threads:", threads, MAX_ARGON2_THREADS)
            argon2_total += passes * memory
            if argon2_total > MAX_ARGON2_WORK_KIB:
                raise _too_much(
                    image, slot, "argon2 work (time x KiB, all keyslots) of", argon2_total, MAX_ARGON2_WORK_KIB
                )
        else:
            raise BadImageError(f"{image} keyslot {slot} uses an unknown KDF ({kind!r}); {_REFUSE}")
