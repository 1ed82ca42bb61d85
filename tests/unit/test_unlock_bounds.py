"""LUKS2 unlock-cost caps on header metadata alone (no image, no libcryptsetup)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from scratchfs.exitcodes import EXIT_BAD_IMAGE
from scratchfs.volume.errors import BadImageError
from scratchfs.volume.unlock_bounds import MAX_ARGON2_MEMORY_KIB, MAX_PBKDF2_ITERATIONS, check_unlock_cost

IMG = Path("/v.img")


def slot(kdf: dict[str, Any], key_size: int = 64) -> dict[str, Any]:
    return {"type": "luks2", "key_size": key_size, "af": {"type": "luks1", "stripes": 4000, "hash": "sha256"},
            "area": {"type": "raw", "key_size": key_size}, "kdf": kdf}


PBKDF2 = {"type": "pbkdf2", "hash": "sha256", "iterations": 1000}
# What `cryptsetup luksFormat` benchmarks to by default on a fast machine.
ARGON2 = {"type": "argon2id", "time": 4, "memory": MAX_ARGON2_MEMORY_KIB, "cpus": 4}


def test_ordinary_headers_pass() -> None:
    check_unlock_cost(IMG, {"keyslots": {"0": slot(PBKDF2), "1": slot(PBKDF2)}})
    check_unlock_cost(IMG, {"keyslots": {"0": slot(ARGON2)}})
    check_unlock_cost(IMG, {"keyslots": {}})  # erased


@pytest.mark.parametrize(
    "meta",
    [
        {"keyslots": {"0": slot({**PBKDF2, "iterations": 2**32 - 1})}},
        # each slot under the cap, together over it: a wrong key tries every slot
        {"keyslots": {str(i): slot({**PBKDF2, "iterations": MAX_PBKDF2_ITERATIONS // 2 + 1}) for i in range(2)}},
        {"keyslots": {"0": slot(PBKDF2, key_size=1 << 20)}},
        {"keyslots": {"0": slot({**ARGON2, "memory": 4 << 20})}},
        {"keyslots": {"0": slot({**ARGON2, "time": 2**32 - 1})}},
        {"keyslots": {"0": slot({**ARGON2, "cpus": 64})}},
        {"keyslots": {"0": slot({**PBKDF2, "iterations": "1000"})}},
        {"keyslots": {"0": slot({**PBKDF2, "iterations": True})}},
        {"keyslots": {"0": slot({"type": "scrypt"})}},
        {"keyslots": {"0": {**slot(PBKDF2), "af": {"stripes": 1 << 30}}}},
    ],
)
def test_absurd_headers_are_refused_with_the_volume_exit_code(meta: dict[str, Any]) -> None:
    with pytest.raises(BadImageError) as e:
        check_unlock_cost(IMG, meta)
    assert e.value.exit_code == EXIT_BAD_IMAGE
    assert "\n" not in str(e.value) and "keyslot" in str(e.value) and "; " in str(e.value)
