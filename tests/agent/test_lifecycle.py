"""The agent end to end: real platform, real volume, real scratchfs, real rsyslog, real
loopback targets. Covers each numbered step of ``run``, deactivation, crash recovery,
the client-only guarantee and upload retry."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from agent import state as statemod
from agent.exitcodes import EXIT_DEACTIVATED
from agent.jobs import JobRunner, JobSettings
from agent.scan.model import ScanOptions
from agent.scratch import clear_stale
from agent.timesync import Clock
from agent.tls import client_context
from agent.unlock import share_name
from agent.volumekey import derive_keyslot_passphrase
from protocol import api, sealing
from protocol.client import PlatformClient
from scratchfs.keyholder import mountinfo, procs
from scratchfs.keyholder.wipe import wipe
from scratchfs.volume import api as volume_api
from scratchfs.volume import state as volume_statemod
from tests.agent.conftest import AgentRun, Rsyslog, run_agent_cli
from tests.mounting import is_mounted, mount
from tools.demo import Platform, file_markers, mounts_under, seal_credential, start_platform
from tools.loopback_targets import Service, _serve, closed_port, start_banner_service, start_http_auth_service
from tools.platform import db

CRED = b"lifecycle-user:pw-LIFECYCLE-CANARY"
MARKERS = {"banner": b"LifeSSH_CANARY", "page": b"lifecycle-secret-CANARY",
           "password": b"pw-LIFECYCLE-CANARY"}


@pytest.fixture
def services() -> Iterator[dict[str, Service]]:
    svcs = {
        "ssh": start_banner_service("ssh", b"SSH-2.0-" + MARKERS["banner"] + b"\r\n"),
        "web": start_http_auth_service(CRED, b"realm", MARKERS["page"]),
    }
    yield svcs
    for s in svcs.values():
        s.close()


def jobs(platform: Platform) -> list[dict[str, object]]:
    return json.loads(platform.cli("job", "list", "--json").stdout)  # type: ignore[no-any-return]


def add_job(platform: Platform, ports: str, *extra: str) -> str:
    return platform.cli(
        "job", "add", "app1", "--targets", "127.0.0.1", "--ports", ports, *extra
    ).stdout.decode().strip()


def event_order(log: str, events: list[str]) -> list[str]:
    """The subset of *events* found in *log*, in the order they first appear."""
    found = [(log.find(f"event={e}"), e) for e in events if f"event={e}" in log]
    return [e for _, e in sorted(found)]


# --- /proc socket sampler ------------------------------------------------------------------


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = {root}, [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _socket_inodes(pids: set[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    return inodes


@dataclass
class SocketSampler:
    """Samples the agent's (and its children's) sockets in /proc/net/* throughout a run."""

    pid: int
    samples: int = 0
    tcp_states: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        inodes = _socket_inodes(_descendants(self.pid))
        for table in ("tcp", "tcp6", "udp", "udp6"):
            try:
                with open(f"/proc/{self.pid}/net/{table}") as f:
                    rows = f.read().splitlines()[1:]
            except OSError:
                return
            for row in rows:
                cols = row.split()
                if cols[9] not in inodes:
                    continue
                if table.startswith("udp"):
                    self.violations.append(f"{table} socket {cols[1]} (inode {cols[9]})")
                else:
                    self.tcp_states[cols[3]] = self.tcp_states.get(cols[3], 0) + 1
                    if cols[3] == "0A":  # TCP_LISTEN
                        self.violations.append(f"listening {table} {cols[1]}")
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def __enter__(self) -> SocketSampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=10)


# --- helpers that use the appliance's own identity -------------------------------------------


def appliance_client(state_dir: Path) -> tuple[statemod.AgentState, PlatformClient]:
    st = statemod.load_state(state_dir)
    ctx = client_context(st.ca_pem, Clock(), st.cert_pem, st.tls_key_pem())
    return st, PlatformClient(st.endpoint.url, ctx)


async def open_boot(st: statemod.AgentState, client: PlatformClient) -> None:
    """A boot of its own, as the agent's: keys and jobs need the latest session."""
    await client.open_session(st.keystore.next_boot(), st.keystore.kind)


def volume_passphrase(state_dir: Path) -> bytearray:
    """The passphrase that opens the appliance's volume now, worked out as the agent does:
    the platform-held passphrase, or (split keys) the platform's share of the current
    epoch combined with the appliance share in the keystore. The caller wipes it."""
    st, client = appliance_client(state_dir)
    trio.run(open_boot, st, client)
    current = trio.run(client.volume_key).current
    if current.epoch == 0:
        return st.open_sealed(current.sealed, api.SEAL_CONTEXT_VOLUME_KEY)
    platform_share = st.open_sealed(current.sealed, api.SEAL_CONTEXT_VOLUME_SHARE)
    appliance_share = st.keystore.load(share_name(current.epoch))
    try:
        return derive_keyslot_passphrase(platform_share, appliance_share, st.appliance, current.epoch)
    finally:
        wipe(platform_share)
        wipe(appliance_share)


def backing_of_closed_volume(state_dir: Path, where: Path) -> list[str]:
    """Open the agent's volume with its own key (as the agent would) and list the backing."""
    key = volume_passphrase(state_dir)
    st = statemod.load_state(state_dir)
    where.mkdir(exist_ok=True)
    try:
        vol = volume_api.open_volume(st.volume_image, where, key, run_dir=where.parent / "vr")
    finally:
        wipe(key)
    try:
        backing = where / "backing"
        # ".scratchfs" is the store's marker file, not a blob.
        return sorted(p.name for p in backing.iterdir() if p.name != ".scratchfs")
    finally:
        vol.close()


# --- tests -----------------------------------------------------------------------------------


def test_full_run_every_step_client_only_with_syslog(
    platform: Platform, activated: Path, services: dict[str, Service], rsyslog: Rsyslog,
    agent_factory: Callable[..., AgentRun], tmp_path: Path,
) -> None:
    platform.cli("syslog", "set", "--host", "127.0.0.1", "--port", str(rsyslog.port),
                 "--ca", str(rsyslog.pki.ca_path))
    seal_credential(platform, "app1", "lifecycle-user", MARKERS["password"], tmp_path, "web-login",
                    ["--target", "127.0.0.1", "--ports", str(services["web"].port),
                     "--protocol", "http-basic", "--allow-cleartext"])  # fmt: skip
    closed = closed_port()
    ports = f"{services['ssh'].port},{services['web'].port},{closed}"
    job_id = add_job(platform, ports, "--credential", "web-login")

    run = agent_factory(activated, "--once")
    with SocketSampler(run.proc.pid) as sampler:
        run.proc.wait(timeout=240)
    log = run.stderr()
    assert run.proc.returncode == 0, log[-2000:]

    # Steps 1-5 happened, in order.
    steps = ["time_sync", "syslog_forwarding", "first_boot_format", "volume_open",
             "scratch_mounted", "job_received", "credential_check", "upload_acknowledged",
             "job_shredded", "scratch_unmounted", "shutdown"]
    assert event_order(log, steps) == steps
    # The result arrived once, with the authenticated banner and without the credential.
    [job] = [j for j in jobs(platform) if j["id"] == job_id]
    assert job["state"] == "done" and job["attempts"] == 1
    raw = platform.cli("results", "show", job_id, "--json").stdout
    doc = json.loads(raw)["result"]
    by_port = {p["port"]: p for h in doc["hosts"] for p in h["ports"]}
    assert set(by_port) == {services["ssh"].port, services["web"].port}
    assert by_port[services["web"].port]["auth"] == "accepted"
    assert by_port[services["ssh"].port]["auth"] == "credential_out_of_scope"  # not in its scope
    assert MARKERS["page"].decode() in by_port[services["web"].port]["banner"]
    assert b"LIFECYCLE-CANARY" not in raw and b"lifecycle-user" not in raw
    assert services["web"].authorized == 1
    # Nothing secret in the agent's own log.
    assert "LIFECYCLE-CANARY" not in log and "lifecycle-user" not in log
    # Client only: sampled throughout, never a listener or a UDP socket; the sampler did
    # see the agent's outbound TCP connections (01 = ESTABLISHED), so it was looking.
    assert sampler.samples > 20
    assert sampler.violations == []
    assert sampler.tcp_states.get("01", 0) > 0
    # Scan logs reached the real rsyslog over TLS, tagged with the appliance name.
    lines = rsyslog.wait_for(lambda got: any("event=upload_acknowledged" in ln for ln in got))
    scan_lines = [ln for ln in lines if " app1 scanner-agent " in ln]
    assert any("event=scan_start" in ln for ln in scan_lines)
    assert any("event=credential_check" in ln for ln in scan_lines)
    assert not any("LIFECYCLE-CANARY" in ln for ln in lines)
    # Shutdown left nothing mounted, and the image holds no plaintext.
    assert mounts_under(activated) == []
    assert file_markers(activated / "volume.img", MARKERS) == []

    # Second boot: the volume already exists (no format), the key opens it again.
    job2 = add_job(platform, str(services["ssh"].port))
    run2 = agent_factory(activated, "--once")
    run2.proc.wait(timeout=240)
    log2 = run2.stderr()
    assert run2.proc.returncode == 0, log2[-2000:]
    assert "first_boot_format" not in log2 and "event=volume_open" in log2
    assert [j["state"] for j in jobs(platform) if j["id"] == job2] == ["done"]


def test_platform_retargeting_gets_out_of_scope_and_zero_secret_bytes(
    platform: Platform, activated: Path, agent_factory: Callable[..., AgentRun], tmp_path: Path,
) -> None:
    """A platform that points a credential at a host it controls (bypassing its own check by
    writing its database) gets credential_out_of_scope, and the host gets nothing secret."""
    inside = start_http_auth_service(CRED, b"realm", b"inside", "127.0.0.1")
    outside = start_http_auth_service(CRED, b"realm", b"outside", "127.0.0.2")
    try:
        seal_credential(platform, "app1", "lifecycle-user", MARKERS["password"], tmp_path, "web-login",
                        ["--target", "127.0.0.1", "--ports", f"{inside.port},{outside.port}",
                         "--protocol", "http-basic", "--allow-cleartext"])  # fmt: skip
        refused = platform.cli("job", "add", "app1", "--targets", "127.0.0.2", "--ports", str(outside.port),
                               "--credential", "web-login", check=False)  # fmt: skip
        assert refused.returncode == 6 and b"outside the scope" in refused.stderr
        storage = db.Storage(platform.state / "platform.db")
        try:
            job_id = str(storage.add_job("app1", ["127.0.0.2"], str(outside.port), "builtin", None, time.time()))
            with storage._tx() as sql:
                sql.execute("UPDATE jobs SET credential_id = (SELECT id FROM credentials WHERE name = ?) "
                            "WHERE id = ?", ("web-login", int(job_id)))  # fmt: skip
        finally:
            storage.close()
        run = agent_factory(activated, "--once")
        run.proc.wait(timeout=240)
        log = run.stderr()
        assert run.proc.returncode == 0, log[-2000:]
        assert "event=credential_refused" in log and "reason=credential_out_of_scope" in log
        doc = json.loads(platform.cli("results", "show", job_id, "--json").stdout)["result"]
        [port] = [p for h in doc["hosts"] for p in h["ports"]]
        assert port["port"] == outside.port and port["auth"] == "credential_out_of_scope"
        assert outside.connections >= 1  # probed: it asked for authentication
        for secret in (MARKERS["password"], base64.b64encode(CRED)):
            assert secret not in outside.received
        assert outside.authorized == 0 and inside.connections == 0
    finally:
        inside.close()
        outside.close()


def test_appliance_from_before_v2_upgrades_its_sealing_key_without_reimaging(
    platform: Platform, activated: Path, agent_factory: Callable[..., AgentRun], tmp_path: Path,
) -> None:
    """New activations get a hybrid key; an appliance activated before sealing v2 (no hybrid
    key on either side) keeps working on v1, then `scanner-agent seal-key upgrade` moves
    it: the platform learns the key over mTLS and the same volume opens with a v2 seal."""
    assert (activated / statemod.SEAL_KEY_HYBRID).exists()  # a new activation: hybrid
    pubkey = platform.cli("appliance", "pubkey", "app1").stdout
    assert b"MLKEM768X25519" in pubkey
    # Turn it into an appliance from before v2 on both sides.
    (activated / statemod.SEAL_KEY_HYBRID).unlink()
    storage = db.Storage(platform.state / "platform.db")
    try:
        with storage._tx() as sql:
            sql.execute("UPDATE appliances SET hybrid_public = NULL WHERE name = 'app1'")
    finally:
        storage.close()
    refused = platform.cli("appliance", "pubkey", "app1", check=False)
    assert refused.returncode == 4 and b"seal-key upgrade" in refused.stderr
    first = agent_factory(activated, "--once")
    job1 = add_job(platform, str(closed_port()))
    first.proc.wait(timeout=240)
    assert first.proc.returncode == 0, first.stderr()[-2000:]
    assert "event=first_boot_format" in first.stderr()
    assert [j["state"] for j in jobs(platform) if j["id"] == job1] == ["done"]

    up = run_agent_cli("seal-key", "upgrade", str(activated))
    assert up.returncode == 0 and "created and registered" in up.stdout, up.stderr
    again = run_agent_cli("seal-key", "upgrade", str(activated))  # idempotent
    assert again.returncode == 0 and "already present" in again.stdout, again.stderr
    assert b"MLKEM768X25519" in platform.cli("appliance", "pubkey", "app1").stdout
    st, client = appliance_client(activated)
    trio.run(open_boot, st, client)
    assert sealing.check_format(trio.run(client.volume_key).current.sealed) == 2
    second = agent_factory(activated, "--once")
    job2 = add_job(platform, str(closed_port()))
    second.proc.wait(timeout=240)
    log = second.stderr()
    assert second.proc.returncode == 0, log[-2000:]
    assert "first_boot_format" not in log and "event=volume_open" in log  # same volume, v2 seal
    assert [j["state"] for j in jobs(platform) if j["id"] == job2] == ["done"]


def test_deactivation_erases_keyslots_and_exits(
    platform: Platform, activated: Path, agent_factory: Callable[..., AgentRun],
) -> None:
    run = agent_factory(activated, "--poll-wait", "1")
    assert run.wait_log("event=scratch_mounted"), run.stderr()[-2000:]
    assert volume_api.dump_volume(activated / "volume.img")["keyslots"]
    platform.cli("appliance", "deactivate", "app1")
    run.proc.wait(timeout=120)
    log = run.stderr()
    assert run.proc.returncode == EXIT_DEACTIVATED, log[-2000:]
    assert "event=volume_erased" in log
    assert log.strip().splitlines()[-1].startswith("scanner-agent: ")
    assert "deactivated" in log.strip().splitlines()[-1]
    assert volume_api.dump_volume(activated / "volume.img")["keyslots"] == []
    assert mounts_under(activated) == []
    # A later boot is refused by the platform and keeps the documented code.
    run2 = agent_factory(activated, "--once")
    run2.proc.wait(timeout=120)
    assert run2.proc.returncode == EXIT_DEACTIVATED


def start_tarpit() -> Service:
    """Accepts and says nothing until the client gives up: keeps a probe busy."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    svc = Service("tarpit", s.getsockname()[1], s)

    def handle(conn: socket.socket) -> None:
        while conn.recv(4096):
            pass

    svc.thread = threading.Thread(target=_serve, args=(svc, handle), daemon=True)
    svc.thread.start()
    return svc


def test_agent_killed_mid_job_recovers_and_result_arrives_once(
    platform: Platform, activated: Path, agent_factory: Callable[..., AgentRun],
    services: dict[str, Service], tmp_path: Path,
) -> None:
    tarpit = start_tarpit()
    try:
        job_id = add_job(platform, f"{services['ssh'].port},{tarpit.port}")
        run = agent_factory(activated, "--once", "--banner-timeout", "5")
        deadline = time.monotonic() + 120
        while tarpit.connections == 0 and time.monotonic() < deadline:
            assert run.proc.poll() is None, run.stderr()[-2000:]
            time.sleep(0.05)
        assert tarpit.connections > 0, "the scan never reached the tarpit"
        scratch_pid = int((activated / "run" / "scratchfs.pid").read_text())
        backing = activated / "run" / "volume" / "backing"
        run.proc.send_signal(signal.SIGKILL)
        run.proc.wait(timeout=30)
    finally:
        tarpit.close()
    # scratchfs died with the agent (PR_SET_PDEATHSIG): its keys are gone with it.
    deadline = time.monotonic() + 20
    while procs.alive(scratch_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not procs.alive(scratch_pid)
    leftovers = sorted(p.name for p in backing.iterdir() if p.name != ".scratchfs")
    assert leftovers, "the killed job left no blobs: the crash happened too late to test"

    run2 = agent_factory(activated, "--once")
    run2.proc.wait(timeout=240)
    log = run2.stderr()
    assert run2.proc.returncode == 0, log[-2000:]
    assert "event=recovered_stale_scratch" in log and "recovered_stale_volume" in log
    assert re.search(rf"event=job_received job={job_id} attempt=2", log), log[-2000:]
    [job] = [j for j in jobs(platform) if j["id"] == job_id]
    assert job["state"] == "done" and job["attempts"] == 2
    doc = json.loads(platform.cli("results", "show", job_id, "--json").stdout)
    assert doc["attempts"] == 2 and doc["result"]["job"] == job_id
    # The old blobs were wiped at the fresh mount; a clean shutdown left none at all.
    remaining = backing_of_closed_volume(activated, tmp_path / "inspect")
    assert not set(remaining) & set(leftovers)
    assert remaining == []


async def test_upload_retried_until_acknowledged_and_kept_until_then(
    platform: Platform, activated: Path, tmp_path: Path,
) -> None:
    job_id = add_job(platform, str(closed_port()))
    st, client = appliance_client(activated)
    await open_boot(st, client)
    job = await client.next_job(5)
    assert job is not None and job.id == job_id
    scratch = tmp_path / "scratch"
    runner = JobRunner(
        client, scratch, st.open_sealed, lambda: 0.0,
        JobSettings(ScanOptions(connect_timeout=1, banner_timeout=0.2),
                    upload_backoff_initial=0.2, upload_backoff_max=0.5),
    )
    result_file = runner.job_dir(job_id) / "result.json"
    await trio.to_thread.run_sync(platform.stop)
    seen_during_outage = False
    restarted: list[Platform] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.handle, job)
        with trio.fail_after(60):
            while not result_file.exists():
                await trio.sleep(0.05)
        await trio.sleep(1.0)  # several upload attempts fail meanwhile
        seen_during_outage = result_file.exists()
        restarted.append(await trio.to_thread.run_sync(
            lambda: start_platform(platform.state, init=False, port=platform.port)
        ))
    try:
        assert seen_during_outage, "the result was deleted before the platform acknowledged it"
        assert not runner.job_dir(job_id).exists()  # shredded after the acknowledgement
        [row] = [j for j in jobs(platform) if j["id"] == job_id]
        assert row["state"] == "done" and row["attempts"] == 1
        # Uploading the same body again is acknowledged again (idempotent), still one result.
        body = json.dumps(
            json.loads(platform.cli("results", "show", job_id, "--json").stdout)["result"],
            sort_keys=True, separators=(",", ":"),
        ).encode()
        assert await client.upload_result(job_id, body) == row["result_sha256"]
    finally:
        for p in restarted:
            await trio.to_thread.run_sync(p.stop)


@pytest.mark.parametrize("event", ["sigterm", "scratchfs_dies"])
def test_signal_and_supervision_shut_down_cleanly(
    platform: Platform, activated: Path, agent_factory: Callable[..., AgentRun], event: str,
) -> None:
    """SIGTERM: clean exit 0. scratchfs killed under the agent: exit 26. Both unmount all."""
    run = agent_factory(activated, "--poll-wait", "1")
    assert run.wait_log("event=scratch_mounted"), run.stderr()[-2000:]
    if event == "sigterm":
        run.proc.send_signal(signal.SIGTERM)
    else:
        os.kill(int((activated / "run" / "scratchfs.pid").read_text()), signal.SIGKILL)
    run.proc.wait(timeout=120)
    log = run.stderr()
    assert run.proc.returncode == (0 if event == "sigterm" else 26), log[-2000:]
    if event == "scratchfs_dies":
        assert "scratchfs exited unexpectedly" in log.strip().splitlines()[-1]
    assert "event=shutdown" in log
    assert mounts_under(activated) == []
    assert volume_api.dump_volume(activated / "volume.img")["keyslots"]  # not erased


PROBE_GID = 4321


def _hardening_seen_from_proc(pid: int) -> dict[str, object]:
    """What /proc says about *pid*: its gid, the owner group of its /proc files, core limit, VmLck.

    The kernel gives /proc/PID/* of a dumpable task the task's uid:gid and of a non-dumpable
    one root:root, so with the process running under PROBE_GID a group of 0 on
    /proc/PID/environ shows that PR_SET_DUMPABLE 0 is in effect, without ptrace.
    """
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    core = next(ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines() if ln.startswith("Max core"))
    return {
        "gid": int(fields["Gid"].split()[0]),
        "proc_files_gid": os.stat(f"/proc/{pid}/environ").st_gid,
        "core": core.split()[4:6],
        "vmlck_kb": int(fields["VmLck"].split()[0]),
    }


def test_every_key_holder_is_hardened(
    platform: Platform, activated: Path, agent_factory: Callable[..., AgentRun],
) -> None:
    """The agent, the userspace volume server and scratchfs, checked from /proc while they hold
    keys: non-dumpable, core limit 0, memory locked (root has CAP_IPC_LOCK). All three run
    under PROBE_GID (inherited from the agent) so that the /proc owner probe can tell."""
    drop = ("setpriv", f"--regid={PROBE_GID}", "--clear-groups")
    run = agent_factory(activated, "--poll-wait", "1", prefix=drop)
    assert run.wait_log("event=scratch_mounted"), run.stderr()[-2000:]
    holders = {"agent": run.proc.pid, "scratchfs": int((activated / "run" / "scratchfs.pid").read_text())}
    servers = [st.server_pid for _d, st in volume_statemod.all_states(activated / "run" / "volume-run")]
    if volume_api.pick_backend("auto") == "userspace":
        assert len(servers) == 1 and servers[0] is not None, servers
        holders["volume server"] = servers[0]
    for name, pid in holders.items():
        seen = _hardening_seen_from_proc(pid)
        assert seen["gid"] == PROBE_GID, f"probe setup: {name} should run with the probe gid ({seen})"
        assert seen["proc_files_gid"] == 0, f"{name} is dumpable ({seen})"
        assert seen["core"] == ["0", "0"], f"{name} may dump core ({seen})"
        assert seen["vmlck_kb"] > 0, f"{name} has no locked memory ({seen})"
    # Control: a process started the same way but not hardened shows its own gid: the probe can fail.
    control = subprocess.Popen([*drop, "sleep", "30"])
    try:
        for _ in range(1000):  # setpriv execs sleep in place; probe once it has
            if Path(f"/proc/{control.pid}/comm").read_text().strip() == "sleep":
                break
            time.sleep(0.01)
        assert _hardening_seen_from_proc(control.pid)["proc_files_gid"] == PROBE_GID
    finally:
        control.kill()
        control.wait()
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=120) == 0, run.stderr()[-2000:]


def test_clear_stale_handles_odd_mountpoint_names(tmp_path: Path) -> None:
    """The agent's boot-time clearing finds a scratchfs left at a mount point whose name needs
    mountinfo escapes (space, backslash) and is not ASCII: alive (killed, then unmounted) and
    stale after a kill (unmounted)."""
    backing, mnt = tmp_path / "backing", tmp_path / "scratch ü\\ß x"
    pid_file = tmp_path / f"{mnt.name}.pid"  # where tests.mounting.mount puts it
    try:
        live = mount(backing, mnt)
        assert clear_stale(mnt, pid_file)
        assert not is_mounted(mnt) and not procs.alive(live.pid)
        dead = mount(backing, mnt)
        os.kill(dead.pid, signal.SIGKILL)
        assert procs.wait_gone(dead.pid, None, 10)
        assert is_mounted(mnt) and mountinfo.is_stale(mnt)
        assert clear_stale(mnt, pid_file)
        assert not is_mounted(mnt) and not pid_file.exists()
        assert not clear_stale(mnt, pid_file)  # nothing left: nothing found
    finally:
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
