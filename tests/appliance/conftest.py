"""Fixtures of the appliance test (issue 20): the image, the test bed, the scan target.

The test boots the real image under qemu (TCG) several times and takes about 15 minutes,
so it runs from ``make appliance-test`` (which sets APPLIANCE_TEST=1 and builds the image
first), not from ``make test``; CI runs both (.ci/run).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.agent.conftest import Rsyslog, make_pki, start_rsyslog
from tools import sshd as sshdmod
from tools.appliance import build as buildmod
from tools.appliance.testbed import Platform, Testbed, qemu_problem
from tools.children import stop_child

IMAGE = buildmod.ROOT / "build" / "appliance.raw"
SSH_USER = "sfs-appl-scan"  # its own account: the test runs for many minutes


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip (with the reason) unless asked for, or when qemu cannot run here at all."""
    here = Path(__file__).parent
    mine = [i for i in items if Path(str(i.fspath)).is_relative_to(here)]
    if not mine:
        return
    reason = None
    if os.environ.get("APPLIANCE_TEST") != "1":
        reason = "boots the appliance image for ~15 min: run 'make appliance-test' (sets APPLIANCE_TEST=1)"
    else:
        reason = qemu_problem()
        if reason is not None:
            reason = f"qemu cannot run the appliance here: {reason}"
    if reason is not None:
        for item in mine:
            item.add_marker(pytest.mark.skip(reason=reason))


@dataclass
class Bed:
    """Everything the appliance test talks to."""

    bed: Testbed
    platform: Platform
    sshd: sshdmod.Sshd
    rsyslog: Rsyslog
    password: bytes
    image: Path
    work: Path


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    """Image (warm build), namespace + bridge + dnsmasq, the platform, an sshd (the scan
    target) and an rsyslog (RFC 5425, the platform's syslog target) on the bridge."""
    buildmod.build(IMAGE)
    work = tmp_path_factory.mktemp("appliance")
    password = b"appl-pw-" + secrets.token_hex(8).encode() + b"-MARKER"
    with Testbed.create(work) as testbed:
        host = testbed.netns.host_ip
        platform = testbed.start_platform()
        pki = make_pki(work / "syslog-pki", names=(host,))
        syslog = testbed.netns.call(lambda: start_rsyslog(work / "rsyslog", pki=pki, address=host))
        try:
            platform.cli("syslog", "set", "--host", host, "--port", str(syslog.port), "--ca", str(pki.ca_path))
            sshdmod.ensure_user(password, SSH_USER)
            server = testbed.netns.call(lambda: sshdmod.start(work / "sshd", b"", listen=host, user=SSH_USER))
            try:
                yield Bed(testbed, platform, server, syslog, password, IMAGE, work)
            finally:
                server.stop()
                sshdmod.remove_user(SSH_USER)
        finally:
            stop_child(syslog.proc)
