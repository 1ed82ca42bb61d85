"""A software TPM (Debian's swtpm) for tests and the demo: socket mode in a directory.

    tpm = start_swtpm(Path("/tmp/x/tpm"))   # swtpm socket ... + tpm2_startup -c
    tpm.tcti                                  # "swtpm:path=/tmp/x/tpm/sock"
    tpm.tool("tpm2_pcrextend", "7:sha256=" + "00" * 32)
    tpm.stop()                                # by PID, waits for exit

Each instance has its own state directory (its own endorsement and owner seeds), so two
instances are two different TPMs: what one sealed, the other cannot load.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tools.children import stop_child


@dataclass
class Swtpm:
    """One running swtpm process (TPM 2.0) serving a unix socket."""

    directory: Path
    proc: subprocess.Popen[bytes]

    @property
    def socket(self) -> Path:
        """The TPM command socket."""
        return self.directory / "sock"

    @property
    def tcti(self) -> str:
        """TCTI string for tpm2-tools, tpm2-pytss and ``scanner-agent --tcti``."""
        return f"swtpm:path={self.socket}"

    def tool(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """Run a tpm2-tools command against this TPM; raise RuntimeError when it fails."""
        env = dict(os.environ, TPM2TOOLS_TCTI=self.tcti, TSS2_LOG="all+NONE")
        proc = subprocess.run(list(args), env=env, capture_output=True, timeout=30, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {proc.stderr.decode(errors='replace').strip()[-300:]}")
        return proc

    def extend_pcr(self, pcr: int, data: bytes = b"\x5a" * 32) -> None:
        """Extend a SHA-256 PCR, as a changed boot component would."""
        self.tool("tpm2_pcrextend", f"{pcr}:sha256={data.hex()}")

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL if it lingers."""
        stop_child(self.proc)


def start_swtpm(directory: Path) -> Swtpm:
    """Start swtpm in socket mode with its state in *directory* and run TPM2_Startup(CLEAR)."""
    state = directory / "state"
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    sock = directory / "sock"
    proc = subprocess.Popen(
        [
            "swtpm", "socket", "--tpm2",
            "--tpmstate", f"dir={state}",
            "--server", f"type=unixio,path={sock}",
            "--ctrl", f"type=unixio,path={directory / 'sock.ctrl'}",  # the TCTI's convention
            "--flags", "not-need-init",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(directory / "swtpm.log", "ab"),
    )
    tpm = Swtpm(directory, proc)
    deadline = time.monotonic() + 20
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            tpm.stop()
            raise RuntimeError(f"swtpm did not start; see {directory / 'swtpm.log'}")
        time.sleep(0.02)
    try:
        tpm.tool("tpm2_startup", "-c")
    except BaseException:
        tpm.stop()
        raise
    return tpm
