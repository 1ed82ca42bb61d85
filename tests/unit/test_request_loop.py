"""How long the request loop spins (scratchfs/request_loop.py): bounds and the one-CPU rule."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from scratchfs import request_loop


def test_spin_is_given_in_microseconds_and_bounded() -> None:
    assert request_loop.spin_ns(0) == 0
    assert request_loop.spin_ns(30) == 30_000
    assert request_loop.spin_ns(request_loop.MAX_SPIN_US) == request_loop.MAX_SPIN_US * 1000
    for bad in (-1, request_loop.MAX_SPIN_US + 1):
        with pytest.raises(ValueError):
            request_loop.spin_ns(bad)


def test_installed_pyfuse3_takes_the_spin() -> None:
    # make setup installs the patched build (third_party/pyfuse3); a stock pyfuse3 would get {}.
    assert request_loop.main_kwargs(7) == {"spin_ns": 7000}
    assert request_loop.main_kwargs(None) == {"spin_ns": request_loop.spin_ns(None)}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to compare with one")
def test_no_spin_by_default_on_one_cpu() -> None:
    assert request_loop.default_spin_us() == request_loop.DEFAULT_SPIN_US
    # The rule looks at the CPUs this process may use, so pinning to one turns it off.
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from scratchfs import request_loop; print(request_loop.default_spin_us())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "0"
