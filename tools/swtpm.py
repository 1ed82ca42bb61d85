"""A software TPM (Debian's swtpm) for tests and the demo: socket mode in a directory.

    tpm = start_swtpm(Path("/tmp/x/tpm"))   # swtpm socket ... + tpm2_startup -c
    tpm.tcti                                  # "swtpm:path=/tmp/x/tpm/sock"
    tpm.tool("tpm2_pcrextend", "7:sha256=" + "00" * 32)
    tpm.stop()                                # by PID, waits for exit

Each instance has its own state directory (its own endorsement and owner seeds), so two
instances are two different TPMs: what one sealed, the other cannot load.

With an `EkCa` the TPM is "manufactured" first (``swtpm_setup --create-ek-cert``): it gets
an RSA-2048 endorsement key and an EK certificate in NV index 0x01c00002, signed by a local
CA (swtpm_localca) standing in for the TPM vendor, whose certificates a platform can then be
told to trust (``scanner-platform init --ek-ca``)::

    ca = EkCa(Path("/tmp/x/ek-ca"))          # the "manufacturer"; created on first use
    tpm = start_swtpm(Path("/tmp/x/tpm"), ek_ca=ca)
    ca.bundle                                 # root + issuing CA, PEM, for --ek-ca

A copy of a swtpm state directory is a second TPM with the same endorsement key and EK
certificate: exactly the clone a hardware TPM makes impossible (`copy_state`).
"""

from __future__ import annotations

import os
import shutil
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


@dataclass
class EkCa:
    """A local "TPM manufacturer" CA (swtpm_localca's root + issuing CA) in *directory*."""

    directory: Path

    @property
    def root(self) -> Path:
        """The self-signed root certificate (PEM)."""
        return self.directory / "swtpm-localca-rootca-cert.pem"

    @property
    def issuer(self) -> Path:
        """The issuing CA that signs EK certificates (PEM)."""
        return self.directory / "issuercert.pem"

    @property
    def bundle(self) -> Path:
        """Root and issuing CA in one PEM file (what the platform is told to trust)."""
        path = self.directory / "ek-ca-bundle.pem"
        if not path.exists():
            path.write_bytes(self.issuer.read_bytes() + self.root.read_bytes())
        return path

    def setup_config(self) -> Path:
        """swtpm_setup's configuration naming swtpm_localca with its state in *directory*."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        localca = self.directory / "localca.conf"
        localca.write_text(
            f"statedir = {self.directory}\n"
            f"signingkey = {self.directory / 'signkey.pem'}\n"
            f"issuercert = {self.issuer}\n"
            f"certserial = {self.directory / 'certserial'}\n"
        )
        options = self.directory / "localca.options"
        options.write_text("")
        setup = self.directory / "swtpm_setup.conf"
        setup.write_text(
            "create_certs_tool = /usr/bin/swtpm_localca\n"
            f"create_certs_tool_config = {localca}\n"
            f"create_certs_tool_options = {options}\n"
            "active_pcr_banks = sha256\n"
        )
        return setup


def manufacture(state: Path, ek_ca: EkCa, log: Path) -> None:
    """``swtpm_setup``: EK + EK certificate signed by *ek_ca* into a new TPM state dir."""
    proc = subprocess.run(
        [
            "swtpm_setup", "--tpm2", "--tpmstate", str(state), "--create-ek-cert",
            "--config", str(ek_ca.setup_config()), "--logfile", str(log),
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"swtpm_setup failed ({proc.returncode}); see {log}")


def copy_state(source: Swtpm, directory: Path) -> Path:
    """Copy a (stopped or idle) swtpm's state into *directory*/state: the software-TPM clone."""
    target = directory / "state"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.copytree(source.directory / "state", target)
    return target


def start_swtpm(directory: Path, ek_ca: EkCa | None = None) -> Swtpm:
    """Start swtpm in socket mode with its state in *directory* and run TPM2_Startup(CLEAR).

    With *ek_ca* a new state dir is manufactured first (EK certificate signed by that CA);
    an existing state dir (a restart, a copy) is used as it is.
    """
    state = directory / "state"
    fresh = not state.exists()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    if ek_ca is not None and fresh:
        manufacture(state, ek_ca, directory / "swtpm_setup.log")
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
