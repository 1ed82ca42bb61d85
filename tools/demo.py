"""``make demo``: the whole system on one machine, with embedded defaults.

Steps: start a software TPM (swtpm, socket mode in the temp dir), init a platform in a temp
dir and serve it on 127.0.0.1, add an appliance, activate an agent with its keys in the TPM,
start loopback scan targets (a real OpenSSH server, an FTP banner, a web login),
seal an SSH credential with its scope (127.0.0.1, the SSH port, ssh, the host key pinned),
show the platform refusing a job that retargets it, queue a job, run ``scanner-agent run
--once`` (SSH login + inventory accepted; the web login, outside the scope, refused without
a byte of the secret sent), print the platform's results as a table, prove that neither
the volume image nor the scratch store (sampled while the agent runs) holds any of the
demo's plaintext markers and that no private key is on disk in any encoding, print the
appliance list with the heartbeat state the agent reported in its TPM-backed boot session,
tear everything down (swtpm included, by PID).

Exit code 0 only if every step held; everything is torn down even on failure. The
platform helpers here are also used by tests/agent; the loopback scan targets are
`tools.loopback_targets`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from scratchfs.keyholder import mountinfo
from tools import sshd as sshdmod
from tools.children import stop_child
from tools.loopback_targets import Service, closed_port, start_banner_service, start_http_auth_service

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent

# Plaintext markers: none may appear in the volume image or the scratch store.
MARKERS = {
    "ftp banner": b"demo-ftpd-8b2d71-MARKER",
    "http realm": b"demo-realm-51aa0c-MARKER",
    "secret page": b"ACME-secret-panel-93e7d2-MARKER",
    "credential user": b"demo-operator-6c0f",
    "credential password": b"pw-Zq8vR2-MARKER",
    "credential name": b"demo-cred-a41f",
}
CREDENTIAL = MARKERS["credential user"] + b":" + MARKERS["credential password"]


# --- platform and agent helpers -----------------------------------------------------------


def run(args: list[str], *, timeout: float = 120, input_: bytes | None = None,
        check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run a command; raise RuntimeError with its stderr when it fails and *check*."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        args, capture_output=True, timeout=timeout, input=input_, env=env, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args[:4])}... exited {proc.returncode}: "
            f"{proc.stderr.decode(errors='replace').strip()[-400:]}"
        )
    return proc


@dataclass
class Platform:
    """A reference platform served by a child process on 127.0.0.1."""

    state: Path
    proc: subprocess.Popen[bytes]
    port: int
    hostname: str

    @property
    def url(self) -> str:
        """The URL appliances use."""
        return f"https://{self.hostname}:{self.port}"

    @property
    def ca(self) -> Path:
        """The platform's CA certificate."""
        return self.state / "ca.pem"

    def cli(self, *args: str, input_: bytes | None = None,
            check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run ``scanner-platform ARGS --state DIR``."""
        return run([PY, "-m", "tools.platform", *args, "--state", str(self.state)],
                   input_=input_, check=check)

    def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL if it lingers."""
        stop_child(self.proc)


def start_platform(state: Path, hostname: str = "127.0.0.1", lease_seconds: float = 300,
                   port: int = 0, init: bool = True) -> Platform:
    """``scanner-platform init`` (optionally) and ``serve`` on 127.0.0.1; wait for the port."""
    if init:
        run([PY, "-m", "tools.platform", "init", str(state), "--hostname", hostname])
    addr_file = state / "serve.addr"
    addr_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [PY, "-m", "tools.platform", "serve", str(state), "--listen", f"127.0.0.1:{port}",
         "--lease-seconds", str(lease_seconds), "--poll-interval", "0.2"],
        stdout=subprocess.DEVNULL, stderr=open(state / "serve.log", "ab"),
        env=env,
    )
    deadline = time.monotonic() + 60
    while not addr_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"platform did not start; see {state / 'serve.log'}")
        time.sleep(0.05)
    bound = int(addr_file.read_text().strip().rsplit(":", 1)[1])
    return Platform(state, proc, bound, hostname)


def agent_cmd(*args: str) -> list[str]:
    """argv of ``scanner-agent ARGS``."""
    return [PY, "-m", "agent.cli", *args]


def activate(platform: Platform, name: str, state_dir: Path, tcti: str | None = None,
             *extra: str) -> None:
    """Add appliance *name* and activate an agent state dir for it.

    With *tcti* the keys go into that TPM; without, into the file keystore (asked for
    explicitly, as the agent requires).
    """
    code = platform.cli("appliance", "add", name).stdout.decode().strip()
    keystore = ["--tcti", tcti] if tcti else ["--keystore", "file"]
    run(agent_cmd("activate", str(state_dir), "--platform", platform.url,
                  "--ca", str(platform.ca), "--code", "-", *keystore, *extra),
        input_=code.encode() + b"\n")


def seal_credential(platform: Platform, appliance: str, username: str, secret: bytes, workdir: Path,
                    name: str, scope_args: list[str]) -> None:
    """Seal *secret* and its scope (scanner-seal flags) to the appliance, add it to the platform."""
    pub = workdir / f"{appliance}.pub"
    pub.write_bytes(platform.cli("appliance", "pubkey", appliance).stdout)
    sealed = run([PY, "-m", "tools.seal", "--appliance-key", str(pub), "--username", username,
                  *scope_args], input_=secret).stdout
    blob = workdir / f"{name}.sealed"
    blob.write_bytes(sealed)
    platform.cli("credential", "add", name, "--appliance", appliance, "--sealed", str(blob))


def mounts_under(prefix: Path) -> list[tuple[str, str]]:
    """(mountpoint, fstype) of every mount below *prefix*, deepest first."""
    return [(e.mountpoint, e.fstype) for e in mountinfo.under(prefix, include_self=False)]


def clear_mounts(agent_state: Path) -> list[str]:
    """Last-resort teardown of whatever an agent left mounted below *agent_state*."""
    from scratchfs.volume import api as volume_api
    from scratchfs.volume.errors import VolumeError

    left = [m for m, _ in mounts_under(agent_state)]
    scratch = agent_state / "run" / "scratch"
    if str(scratch) in left:
        subprocess.run(["umount", "-l", str(scratch)], check=False, capture_output=True)
    volume = agent_state / "run" / "volume"
    if str(volume) in left or (agent_state / "run" / "volume-run").exists():
        try:
            volume_api.close_volume(volume, run_dir=agent_state / "run" / "volume-run")
        except VolumeError:
            pass
    for mnt, _ in mounts_under(agent_state):
        subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
    return left


def find_markers(data: bytes, markers: dict[str, bytes]) -> list[str]:
    """Names of the markers present in *data*."""
    return [name for name, m in markers.items() if m in data]


def file_markers(path: Path, markers: dict[str, bytes]) -> list[str]:
    """Markers found in a (possibly large) file, read in overlapping chunks."""
    found: set[str] = set()
    overlap = max(len(m) for m in markers.values())
    tail = b""
    with open(path, "rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            found.update(find_markers(tail + chunk, markers))
            tail = chunk[-overlap:]
    return sorted(found)


class BackingSampler:
    """Reads every blob of the scratch store while the agent runs, looking for markers."""

    def __init__(self, backing: Path, markers: dict[str, bytes], interval: float = 0.05) -> None:
        self.backing = backing
        self.markers = markers
        self.interval = interval
        self.samples = 0
        self.blobs_seen: set[str] = set()
        self.found: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                entries = list(self.backing.iterdir())
            except OSError:
                continue
            self.samples += 1
            for entry in entries:
                try:
                    data = entry.read_bytes()
                except OSError:
                    continue
                self.blobs_seen.add(entry.name)
                self.found.update(find_markers(data, self.markers))

    def __enter__(self) -> BackingSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# --- the demo ------------------------------------------------------------------------------


class Step:
    """Numbered progress output; failures are collected, not raised, so teardown runs."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.n = 0
        self.failed: list[str] = []

    @contextmanager
    def __call__(self, title: str) -> Iterator[list[str]]:
        self.n += 1
        print(f"[{self.n:2d}/{self.total}] {title} ...", flush=True)
        notes: list[str] = []
        try:
            yield notes
        except Exception as e:
            print(f"        FAILED: {e}", flush=True)
            if os.environ.get("DEMO_DEBUG"):
                traceback.print_exc()
            self.failed.append(title)
            raise
        for note in notes:
            print(f"        {note}", flush=True)
        print("        ok", flush=True)


def private_key_forms(agent_state: Path, tcti: str) -> dict[str, bytes]:
    """Every encoding of the appliance's private keys, unwrapped the way the agent does."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent import state as statemod
    from protocol import sealing

    st = statemod.load_state(agent_state, tcti)
    try:
        pem = bytes(st.tls_key_pem())
        seal = bytes(st.seal_private())
        hybrid = bytes(statemod.load_hybrid_key(st.keystore) or b"")
    finally:
        st.forget()
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    none = serialization.NoEncryption()
    forms = {
        "TLS key PEM": pem,
        "TLS key PKCS#8 DER": key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, none),
        "TLS key SEC1 DER": key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, none
        ),
        "TLS key raw scalar": key.private_numbers().private_value.to_bytes(32, "big"),
        "sealing key raw": seal,
        "hybrid sealing key raw": hybrid,
        "hybrid ML-KEM-768 seed": hybrid[: sealing.MLKEM_SEED_LEN],
        "hybrid X25519 key": hybrid[sealing.MLKEM_SEED_LEN :],
        "any PEM private key": b"PRIVATE KEY",
    }
    return {name: form for name, form in forms.items() if form}  # no hybrid key: nothing to find


def demo(work: Path) -> int:
    """Run every step in *work*; return 0 only if all of them held."""
    from tools.swtpm import Swtpm, start_swtpm

    step = Step(17)
    services: list[Service] = []
    platform: Platform | None = None
    sshd: sshdmod.Sshd | None = None
    tpm: Swtpm | None = None
    agent_state = work / "appliance"
    password = MARKERS["credential password"]
    try:
        with step("start a software TPM (swtpm, socket mode) and TPM2_Startup") as notes:
            tpm = start_swtpm(work / "tpm")
            notes.append(f"TPM 2.0 at {tpm.tcti} (pid {tpm.proc.pid})")
        assert tpm is not None
        with step("init the platform and serve it on 127.0.0.1") as notes:
            platform = start_platform(work / "platform")
            # A short beat so that the demo's one job shows a few heartbeats.
            platform.cli("heartbeat", "set", "--interval", "10", "--missing-after", "3")
            notes.append(f"platform at {platform.url} (CA {platform.ca}), heartbeat every 10 s")
        assert platform is not None
        with step("add appliance 'demo-appliance' and activate the agent (keys in the TPM)") as notes:
            activate(platform, "demo-appliance", agent_state, tpm.tcti)
            mode = oct(agent_state.stat().st_mode & 0o777)
            notes.append(f"state dir {agent_state} ({mode}), bound to {platform.url}")
            notes.append("state files: " + " ".join(sorted(p.name for p in agent_state.iterdir())))
            notes.append("keys: AES-GCM envelopes (*.tpm) under a wrapping key sealed by this TPM")
        with step("start loopback scan targets") as notes:
            sshdmod.ensure_user(password)
            sshd = sshdmod.start(work / "sshd", b"")
            ftp = start_banner_service("ftp", b"220 " + MARKERS["ftp banner"] + b" FTP ready\r\n")
            web = start_http_auth_service(CREDENTIAL, MARKERS["http realm"], MARKERS["secret page"])
            services += [ftp, web]
            closed = closed_port()
            notes.append(f"sshd      127.0.0.1:{sshd.port} (Debian OpenSSH, user {sshdmod.SSH_USER})")
            for s in services:
                notes.append(f"{s.name:9s} 127.0.0.1:{s.port}")
            notes.append(f"closed    127.0.0.1:{closed}")
        assert sshd is not None
        with step("seal the SSH credential with its scope and add it") as notes:
            scope_args = ["--target", "127.0.0.1", "--ports", str(sshd.port), "--protocol", "ssh",
                          "--pin-ssh-sha256", sshd.host_key_sha256]
            seal_credential(platform, "demo-appliance", sshdmod.SSH_USER, password, work,
                            MARKERS["credential name"].decode(), scope_args)
            notes.append("scope: 127.0.0.1, port " + str(sshd.port) + ", ssh, host key pinned")
            notes.append("sealed with HPKE MLKEM768-X25519 (scanner-seal); platform sees ciphertext")
        with step("the platform refuses to retarget the credential at 127.0.0.2") as notes:
            proc = platform.cli("job", "add", "demo-appliance", "--targets", "127.0.0.2",
                                "--ports", str(sshd.port), "--credential",
                                MARKERS["credential name"].decode(), check=False)
            if proc.returncode != 6:
                raise RuntimeError(f"job add outside the scope exited {proc.returncode}, not 6")
            notes.append("job add: " + proc.stderr.decode(errors="replace").strip()[:150])
        with step("queue a scan job") as notes:
            ports = ",".join(str(p) for p in (sshd.port, ftp.port, web.port, closed))
            job_id = platform.cli(
                "job", "add", "demo-appliance", "--targets", "127.0.0.1", "--ports", ports,
                "--credential", MARKERS["credential name"].decode(),
            ).stdout.decode().strip()
            notes.append(f"job {job_id}: 127.0.0.1 ports {ports}")
        backing = agent_state / "run" / "volume" / "backing"
        with step("run 'scanner-agent run --once' (sampling the scratch store meanwhile)") as notes:
            with BackingSampler(backing, MARKERS) as sampler:
                started = time.monotonic()
                proc = run(agent_cmd("run", str(agent_state), "--once", "--volume-size", "64M",
                                     "--poll-wait", "5", "--connect-timeout", "1",
                                     "--banner-timeout", "0.5"), timeout=300, check=False)
                took = time.monotonic() - started
            log_lines = proc.stderr.decode(errors="replace").splitlines()
            for line in log_lines:
                if "event=" in line and any(k in line for k in (
                    "time_sync", "session_opened", "split_key", "volume_key_committed", "volume_open",
                    "scratch_mounted", "job_received",
                    "credential_check", "credential_refused", "upload_acknowledged",
                    "job_shredded", "shutdown",
                )):
                    notes.append("agent: " + line.split(" ", 1)[1][:110])
            if proc.returncode != 0:
                raise RuntimeError(f"agent exited {proc.returncode}: {log_lines[-1:]}")
            notes.append(f"agent exited 0 after {took:.1f} s")
        with step("the volume opened with the platform share + the appliance share") as notes:
            [app] = json.loads(platform.cli("appliance", "list", "--json").stdout)
            if app["key_scheme"] != "split" or app["key_pending_epoch"] is not None:
                raise RuntimeError(f"the volume key is not split: {app['key_scheme']}")
            epoch = app["key_epoch"]
            committed = [ln for ln in log_lines if f"event=volume_key_committed epoch={epoch} " in ln]
            if not committed or "old_destroyed_proven=True" not in committed[0]:
                raise RuntimeError("the agent did not commit the split key with a proven shred")
            if not (agent_state / f"volume-share-{epoch}.tpm").exists():
                raise RuntimeError("the appliance share is not TPM-wrapped in the keystore")
            notes.append(f"keyslot passphrase = HKDF(platform share, appliance share), key epoch {epoch}")
            notes.append("platform share: KEK-wrapped in the platform's database, sealed to this boot's session")
            notes.append(f"appliance share: volume-share-{epoch}.tpm, wrapped by this TPM; never leaves it")
            notes.append("the platform's activation passphrase: destroyed, proven gone from its database")
        with step("the platform's results") as notes:
            table = platform.cli("results", "show", job_id).stdout.decode()
            print("\n".join("        " + ln for ln in table.rstrip().splitlines()), flush=True)
            doc = json.loads(platform.cli("results", "show", job_id, "--json").stdout)["result"]
            ports_found = {p["port"]: p for h in doc["hosts"] for p in h["ports"]}
            if set(ports_found) != {sshd.port, ftp.port, web.port}:
                raise RuntimeError(f"open ports {sorted(ports_found)} are not the 3 services")
            ssh_entry = ports_found[sshd.port]
            uname = ssh_entry.get("inventory", {}).get("uname -a", "")
            if ssh_entry.get("auth") != "accepted" or "Linux" not in uname:
                raise RuntimeError("the SSH login with inventory did not succeed")
            if ports_found[web.port].get("auth") != "credential_out_of_scope" or web.authorized:
                raise RuntimeError("the web login outside the scope was not refused")
            sent = [m for m in (password, base64.b64encode(CREDENTIAL)) if m in web.received]
            if sent:
                raise RuntimeError("the out-of-scope web service received secret bytes")
            notes.append("ssh: accepted, inventory: " + ssh_entry["inventory"]["uname -a"][:70])
            notes.append(f"web 127.0.0.1:{web.port}: credential_out_of_scope, "
                         f"{len(web.received)} bytes received, 0 of them secret")
        with step("the credential never reached the result") as notes:
            raw = platform.cli("results", "show", job_id, "--json").stdout
            leaked = find_markers(raw, {k: v for k, v in MARKERS.items() if "credential" in k})
            if leaked:
                raise RuntimeError(f"result contains {leaked}")
            notes.append("no user name or password in the uploaded document")
        with step("the scratch store held no plaintext while the agent ran") as notes:
            if sampler.samples == 0 or not sampler.blobs_seen:
                raise RuntimeError("the sampler never saw the scratch store; nothing was proven")
            if sampler.found:
                raise RuntimeError(f"markers found in scratch blobs: {sorted(sampler.found)}")
            notes.append(f"{sampler.samples} samples, {len(sampler.blobs_seen)} blobs read, "
                         f"0 of {len(MARKERS)} markers")
        with step("the volume image holds no plaintext") as notes:
            image = agent_state / "volume.img"
            found = file_markers(image, MARKERS)
            if found:
                raise RuntimeError(f"markers found in {image}: {found}")
            left = [p for p in agent_state.rglob("*") if p.is_file() and p != image]
            found_elsewhere = [str(p) for p in left if file_markers(p, MARKERS)]
            if found_elsewhere:
                raise RuntimeError(f"markers found in {found_elsewhere}")
            notes.append(f"{image.stat().st_size // (1024 * 1024)} MiB image and "
                         f"{len(left)} other state files: 0 markers")
        with step("no private key on disk in any encoding (state dir and volume image)") as notes:
            forms = private_key_forms(agent_state, tpm.tcti)
            files = [p for p in agent_state.rglob("*") if p.is_file()]
            hits = [f"{p.name}: {name}" for p in files for name in file_markers(p, forms)]
            if hits:
                raise RuntimeError(f"private key material found: {hits}")
            notes.append(f"{len(files)} files searched for {len(forms)} encodings of the TLS and sealing "
                         "keys: 0 found")
        with step("nothing left mounted") as notes:
            left_mounts = mounts_under(agent_state)
            if left_mounts:
                raise RuntimeError(f"still mounted: {left_mounts}")
            notes.append("scratchfs unmounted, volume closed")
        with step("the appliance list: heartbeat state and TPM-backed boot session") as notes:
            table = platform.cli("appliance", "list").stdout.decode()
            print("\n".join("        " + ln for ln in table.rstrip().splitlines()), flush=True)
            [app] = json.loads(platform.cli("appliance", "list", "--json").stdout)
            beat = app["heartbeat"] or {}
            if app["last_seen"] is None or beat.get("jobs_done") != 1:
                raise RuntimeError(f"no heartbeat reported the finished job: {beat}")
            if app["keystore"] != "tpm" or beat.get("boot_counter") != app["boot_counter"]:
                raise RuntimeError(f"heartbeat not in the TPM-backed boot session: {beat} vs {app}")
            notes.append(f"health {app['health']}: last heartbeat reported agent {beat['agent_version']}, "
                         f"{beat['jobs_done']} job done, {beat['jobs_failed']} failed, in boot session "
                         f"{beat['boot_session']} (TPM boot counter {beat['boot_counter']}); "
                         "it turns late, then missing, while no agent runs")
    except Exception as e:  # noqa: BLE001 - the step printed it; teardown must still run
        step.failed.append(f"{type(e).__name__}")
    finally:
        print(f"[{step.total:2d}/{step.total}] tear down ...", flush=True)
        for s in services:
            s.close()
        if sshd is not None:
            sshd.stop()
        if shutil.which("userdel"):
            sshdmod.remove_user()
        cleared = clear_mounts(agent_state) if agent_state.exists() else []
        if platform is not None:
            platform.stop()
        if tpm is not None:
            tpm.stop()
        if cleared:
            print(f"        cleared leftover mounts: {cleared}", flush=True)
            step.failed.append("leftover mounts")
        print("        ok", flush=True)
    if step.failed or step.n < step.total - 1:
        print(f"demo FAILED at: {', '.join(step.failed) or 'an unfinished step'}", flush=True)
        return 1
    print("demo OK: every step held", flush=True)
    return 0


def main() -> int:
    """Entry point of ``python -m tools.demo``."""
    if os.geteuid() != 0:
        print("demo: needs root (FUSE, loop devices, mounts); run 'sudo make demo'",
              file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="scratchfs-demo-"))
    os.chmod(work, 0o700)
    try:
        return demo(work)
    finally:
        if not mounts_under(work):
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"demo: mounts left under {work}; not removing it", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
