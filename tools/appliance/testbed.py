"""The appliance's test bed: a network namespace with a bridge, DHCP, the platform, and guests.

    with Testbed.create(work) as bed:            # netns + bridge br0 10.77.N.1/24 + dnsmasq
        platform = bed.start_platform()          # scanner-platform serve on the bridge
        guest = bed.guest("a", disk, tpm_dir)    # swtpm (foreground) + qemu (OVMF, TCG) on a tap
        guest.boot(provision={...}, report=True)
        guest.wait_console("event=job_done", timeout=600)
        guest.poweroff()

Every process is our child, stopped by PID (tools.children.stop_child); the namespace and
with it the bridge and taps are deleted at the end. Every wait has a timeout and a failure
names the log to read (the guest's serial console is a file in its directory).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tools.children import stop_child
from tools.swtpm import EkCa, manufacture

ROOT = Path(__file__).resolve().parent.parent.parent
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
QEMU = "qemu-system-x86_64"
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
T = TypeVar("T")


class TestbedError(RuntimeError):
    """A part of the test bed failed (the message names what and the log to read)."""


def qemu_problem() -> str | None:
    """Why this machine cannot boot the appliance at all, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tap devices)"
    for tool in (QEMU, "swtpm", "dnsmasq", "ip", "nmap", "ping"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make appliance-test installs it)"
    if not OVMF_CODE.exists():
        return f"{OVMF_CODE} is missing (package ovmf)"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing (no tap devices)"
    return None


def run(args: list[str], *, timeout: float = 60, input_: bytes | None = None, check: bool = True
        ) -> subprocess.CompletedProcess[bytes]:
    """Run a command; raise TestbedError with its stderr when it fails and *check*."""
    proc = subprocess.run(args, capture_output=True, timeout=timeout, input=input_, check=False)
    if check and proc.returncode != 0:
        raise TestbedError(f"{' '.join(args[:5])} exited {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace').strip()[-600:]}")
    return proc


def wait_for(what: str, predicate: Callable[[], T | None], timeout: float, interval: float = 0.5,
             log: Path | None = None) -> T:
    """Poll *predicate* until it returns something; raise TestbedError naming *log* on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got is not None and got is not False:
            return got
        if time.monotonic() > deadline:
            where = f"; see {log}" if log else ""
            raise TestbedError(f"timed out after {timeout:.0f} s waiting for {what}{where}")
        time.sleep(interval)


@dataclass
class Netns:
    """A network namespace with a bridge (the appliance's LAN)."""

    name: str
    subnet: int  # <prefix>.<subnet>.0/24
    prefix: str = "10.77"

    @property
    def net(self) -> str:
        """The first three octets of the bridge's /24."""
        return f"{self.prefix}.{self.subnet}"

    @property
    def host_ip(self) -> str:
        """The bridge's address: the platform, DHCP and the scan targets live here."""
        return f"{self.net}.1"

    def exec(self, *args: str) -> list[str]:
        """argv running *args* inside the namespace."""
        return ["ip", "netns", "exec", self.name, *args]

    def ip(self, *args: str) -> None:
        """`ip ARGS` inside the namespace."""
        run(self.exec("ip", *args))

    def call(self, fn: Callable[[], T]) -> T:
        """Run *fn* in a thread that has entered the namespace.

        The network namespace is per thread; sockets made there and children forked from
        there (Popen) live in it, the rest of this process does not move.
        """
        box: dict[str, Any] = {}

        def body() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    box["error"] = OSError(ctypes.get_errno(), "setns failed")
                    return
            finally:
                os.close(fd)
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = e

        thread = threading.Thread(target=body, name=f"netns-{self.name}")
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a long-running child in the namespace's network only (see `call`).

        Not through ``ip netns exec``: that also gives the child a mount namespace of its
        own, a copy of every mount live at that moment. On a host whose mounts are private
        the copies never see our unmounts, so any FUSE mount (a test's, a developer's) made
        before the child started keeps its connection open for the child's lifetime and its
        daemon never exits (found running the appliance test beside the FUSE suites)."""
        return self.call(lambda: subprocess.Popen(argv, **kwargs))

    def add_tap(self, tap: str) -> None:
        """A tap device on the bridge, for one guest NIC."""
        self.ip("tuntap", "add", "dev", tap, "mode", "tap")
        self.ip("link", "set", tap, "master", "br0", "up")

    def open_tap(self, tap: str) -> int:
        """An fd attached to *tap* of this namespace (qemu ``-netdev tap,fd=N`` runs elsewhere)."""

        def attach() -> int:
            fd = os.open("/dev/net/tun", os.O_RDWR)
            try:
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI))
            except OSError:
                os.close(fd)
                raise
            return fd

        return self.call(attach)

    def delete(self) -> None:
        """Delete the namespace (its bridge and taps go with it)."""
        run(["ip", "netns", "delete", self.name], check=False)


def create_netns(name: str, subnet: int, prefix: str = "10.77") -> Netns:
    """A namespace with lo up and a bridge br0 at <prefix>.<subnet>.1/24."""
    run(["ip", "netns", "add", name])
    ns = Netns(name, subnet, prefix)
    try:
        ns.ip("link", "set", "lo", "up")
        ns.ip("link", "add", "br0", "type", "bridge")
        ns.ip("addr", "add", f"{ns.host_ip}/24", "dev", "br0")
        ns.ip("link", "set", "br0", "up")
    except BaseException:
        ns.delete()
        raise
    return ns


@dataclass
class Platform:
    """The reference platform, served inside the namespace on the bridge's address."""

    state: Path
    proc: subprocess.Popen[bytes]
    host: str
    port: int

    @property
    def url(self) -> str:
        """What appliances connect to."""
        return f"https://{self.host}:{self.port}"

    def cli(self, *args: str, input_: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """``scanner-platform ARGS --state DIR`` (the state database, no network)."""
        return run([sys.executable, "-m", "tools.platform", *args, "--state", str(self.state)], input_=input_,
                   check=check, timeout=120)

    def appliance(self, name: str) -> dict[str, Any]:
        """One appliance's row of ``appliance list --json``."""
        rows = json.loads(self.cli("appliance", "list", "--json").stdout)
        [row] = [r for r in rows if r["name"] == name]
        return row  # type: ignore[no-any-return]

    def stop(self) -> None:
        """SIGTERM by PID."""
        stop_child(self.proc)


@dataclass
class Guest:
    """One appliance VM: its disk, its swtpm, its OVMF variables, its console log."""

    name: str
    directory: Path
    disk: Path
    tpm_state: Path
    netns: Netns
    tap: str
    mac: str
    qemu: subprocess.Popen[bytes] | None = None
    swtpm: subprocess.Popen[bytes] | None = None
    boots: int = 0
    # A second NIC on another network (its own namespace), for the no-forwarding check.
    second_nic: tuple[Netns, str, str] | None = None
    # The "TPM vendor": a new TPM state is manufactured with an EK certificate it signs.
    ek_ca: EkCa | None = None

    @property
    def console(self) -> Path:
        """The serial console of the current boot (console-N.log)."""
        return self.directory / f"console-{self.boots}.log"

    def console_text(self) -> str:
        """What the current boot printed so far."""
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_console(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until the console shows *pattern* (a regex); fail early if qemu exits."""

        def seen() -> re.Match[str] | None:
            m = re.search(pattern, self.console_text())
            if m is None and self.qemu is not None and self.qemu.poll() is not None:
                raise TestbedError(f"the guest stopped (qemu exit {self.qemu.returncode}) before "
                                   f"{pattern!r} appeared; see {self.console}")
            return m

        return wait_for(f"{pattern!r} on {self.name}'s console", seen, timeout, log=self.console)

    def _start_swtpm(self) -> Path:
        fresh = not self.tpm_state.exists() or not any(self.tpm_state.iterdir())
        self.tpm_state.mkdir(parents=True, exist_ok=True, mode=0o700)
        if fresh and self.ek_ca is not None:
            manufacture(self.tpm_state, self.ek_ca, self.directory / "swtpm_setup.log")
        ctrl = self.directory / "swtpm.ctrl"
        ctrl.unlink(missing_ok=True)
        # Foreground, under a PID we stop: "--daemon" made qemu fail with CMD_INIT: 0x9.
        self.swtpm = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.tpm_state}",
             "--ctrl", f"type=unixio,path={ctrl}", "--log", f"file={self.directory / 'swtpm.log'},level=1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for("swtpm's control socket", lambda: ctrl.exists() or (self.swtpm is not None
                                                                       and self.swtpm.poll() is not None),
                 20, 0.05)
        if self.swtpm.poll() is not None:
            raise TestbedError(f"swtpm exited {self.swtpm.returncode}; see {self.directory / 'swtpm.log'}")
        return ctrl

    def boot(self, provision: dict[str, str] | None = None, report: bool = False) -> None:
        """Start swtpm and qemu (OVMF, TCG, the disk, a tap on the bridge, the TPM).

        *provision* becomes fw_cfg ``opt/scanner/provision`` (first boot); *report* sets
        ``opt/scanner/report`` so the guest prints its audit report on the console.
        """
        if self.qemu is not None:
            raise TestbedError(f"guest {self.name} is already running")
        self.boots += 1
        vars_file = self.directory / "OVMF_VARS.fd"
        if not vars_file.exists():
            shutil.copyfile(OVMF_VARS, vars_file)
        ctrl = self._start_swtpm()
        qmp = self.directory / "qmp.sock"
        qmp.unlink(missing_ok=True)
        argv = [
            QEMU, "-nodefaults", "-machine", "q35", "-accel", "tcg,thread=multi", "-smp", "2", "-cpu", "max",
            "-m", "1024", "-display", "none", "-no-reboot",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}",
            "-drive", f"file={self.disk},format=raw,if=none,id=disk0",
            "-device", "virtio-blk-pci,drive=disk0",
            "-netdev", f"tap,id=net0,ifname={self.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=net0,mac={self.mac},romfile=",
            "-chardev", f"socket,id=chrtpm,path={ctrl}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-crb,tpmdev=tpm0",
            "-device", "virtio-rng-pci",
            "-serial", f"file:{self.console}",
            "-qmp", f"unix:{qmp},server=on,wait=off",
        ]
        if provision is not None:
            blob = self.directory / "provision.json"
            blob.write_text(json.dumps(provision))
            os.chmod(blob, 0o600)
            argv += ["-fw_cfg", f"name=opt/scanner/provision,file={blob}"]
        if report:
            argv += ["-fw_cfg", "name=opt/scanner/report,string=1"]
        pass_fds: tuple[int, ...] = ()
        if self.second_nic is not None:
            other, tap, mac = self.second_nic
            fd = other.open_tap(tap)
            pass_fds = (fd,)
            argv += ["-netdev", f"tap,id=net1,fd={fd}", "-device", f"virtio-net-pci,netdev=net1,mac={mac},romfile="]
        log = open(self.directory / "qemu.log", "ab")
        try:
            self.qemu = self.netns.popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         pass_fds=pass_fds)
        finally:
            log.close()
            for fd in pass_fds:
                os.close(fd)

    def _qmp(self, *commands: dict[str, Any]) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(str(self.directory / "qmp.sock"))
            reader = sock.makefile("rb")
            reader.readline()  # greeting
            for cmd in ({"execute": "qmp_capabilities"}, *commands):
                sock.sendall(json.dumps(cmd).encode() + b"\n")
                while True:
                    reply = json.loads(reader.readline() or b"{}")
                    if "event" not in reply:
                        break
        finally:
            sock.close()

    def shutdown(self, timeout: float = 300) -> int:
        """Clean shutdown: Ctrl-Alt-Del (systemd stops every unit, then reboots; qemu runs
        with -no-reboot, so it exits). Killed after *timeout*. Returns qemu's exit code."""
        if self.qemu is None:
            return 0
        if self.qemu.poll() is None:
            try:
                self._qmp({"execute": "send-key", "arguments": {"keys": [
                    {"type": "qcode", "data": "ctrl"}, {"type": "qcode", "data": "alt"},
                    {"type": "qcode", "data": "delete"}]}})
            except OSError:
                pass
            try:
                self.qemu.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.stop()

    def stop(self) -> int:
        """Hard stop by PID (qemu, then swtpm), for teardown and failed boots."""
        code = 0
        if self.qemu is not None:
            stop_child(self.qemu, patience=10)
            code = self.qemu.returncode
            self.qemu = None
        if self.swtpm is not None:
            stop_child(self.swtpm, patience=10)
            self.swtpm = None
        return code


@dataclass
class Testbed:
    """The namespace, its DHCP server, the platform and the guests; stop() ends all of them."""

    work: Path
    netns: Netns
    other: Netns  # a second network (10.78.N.0/24) behind the guests' second NIC, if any
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    guests: list[Guest] = field(default_factory=list)
    platform: Platform | None = None
    ek_ca: EkCa | None = None  # set by start_platform: the EK CA the platform trusts

    @classmethod
    @contextmanager
    def create(cls, work: Path) -> Iterator[Testbed]:
        """Namespace + bridge + dnsmasq; everything stopped and deleted on exit."""
        subnet = 100 + os.getpid() % 100
        ns = create_netns(f"sfs-appl-{os.getpid()}", subnet)
        try:
            other = create_netns(f"sfs-appl2-{os.getpid()}", subnet, "10.78")
        except BaseException:
            ns.delete()
            raise
        bed = cls(work, ns, other)
        try:
            bed._start_dnsmasq(ns, work / "dnsmasq")
            bed._start_dnsmasq(other, work / "dnsmasq2")
            yield bed
        finally:
            bed.stop()

    def _start_dnsmasq(self, ns: Netns, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        net = ns.net
        with open(d / "stderr.log", "ab") as err:
            proc = ns.popen(
                ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
                 "--interface=br0", "--bind-interfaces", "--except-interface=lo",
                 f"--dhcp-range={net}.50,{net}.99,255.255.255.0,1h", "--dhcp-authoritative",
                 f"--dhcp-leasefile={d / 'leases'}", "--log-dhcp", f"--log-facility={d / 'dnsmasq.log'}",
                 "--pid-file=", "--user=root", "--group=root"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            )
        self.children.append(proc)
        time.sleep(0.3)
        if proc.poll() is not None:
            raise TestbedError(f"dnsmasq exited {proc.returncode}; see {d}")

    def start(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        """A child inside the namespace (stopped with the bed)."""
        with open(log, "ab") as f:
            proc = self.netns.popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f)
        self.children.append(proc)
        return proc

    def start_platform(self, heartbeat: int = 10) -> Platform:
        """``scanner-platform init`` + ``serve`` on the bridge's address."""
        state = self.work / "platform"
        py = sys.executable
        run([py, "-m", "tools.platform", "init", str(state), "--hostname", self.netns.host_ip], timeout=120)
        addr = state / "serve.addr"
        proc = self.start([py, "-m", "tools.platform", "serve", str(state), "--listen", f"{self.netns.host_ip}:0",
                           "--lease-seconds", "600", "--poll-interval", "0.5"], state / "serve.log")
        wait_for("the platform's address file", lambda: addr.exists() or proc.poll() is not None, 60, 0.1,
                 log=state / "serve.log")
        if proc.poll() is not None:
            raise TestbedError(f"the platform exited {proc.returncode}; see {state / 'serve.log'}")
        port = int(addr.read_text().strip().rsplit(":", 1)[1])
        self.platform = Platform(state, proc, self.netns.host_ip, port)
        self.platform.cli("heartbeat", "set", "--interval", str(heartbeat), "--missing-after", "3")
        # Guests' TPMs get EK certificates from a local "vendor" CA the platform trusts, as a
        # real appliance's TPM does: activation enrolls it and every boot is attested. The CA
        # comes into being with its first EK certificate (a TPM state made only for that).
        self.ek_ca = EkCa(self.work / "ek-ca")
        first = self.work / "ek-ca-first-tpm"
        first.mkdir(mode=0o700)
        manufacture(first, self.ek_ca, self.work / "ek-ca-first-tpm.log")
        self.platform.cli("ek-ca", "set", str(self.ek_ca.bundle))
        return self.platform

    def guest(self, name: str, disk: Path, tpm_state: Path, second_nic: bool = False,
              firmware_of: Guest | None = None) -> Guest:
        """A guest on its own tap; *disk* and *tpm_state* may be shared with another (clones).

        With *second_nic* it also has a NIC on the other network (10.78.N.0/24). With
        *firmware_of* it is a whole copy of that (stopped) guest's VM: its firmware variables
        and its MAC too, so that it measures the same boot (PCR 1 holds the boot options,
        which name the NIC's MAC) and only the boot counter can tell the two apart."""
        index = len(self.guests)
        d = self.work / f"guest-{name}"
        d.mkdir(parents=True, exist_ok=True)
        tap = f"tap{index}"
        self.netns.add_tap(tap)
        mac = f"52:54:00:77:{self.netns.subnet % 256:02x}:{index:02x}"
        if firmware_of is not None:
            shutil.copyfile(firmware_of.directory / "OVMF_VARS.fd", d / "OVMF_VARS.fd")
            mac = firmware_of.mac
        g = Guest(name, d, disk, tpm_state, self.netns, tap, mac, ek_ca=self.ek_ca)
        if second_nic:
            self.other.add_tap(tap)
            g.second_nic = (self.other, tap, f"52:54:00:78:{self.other.subnet % 256:02x}:{index:02x}")
        self.guests.append(g)
        return g

    def stop(self) -> None:
        """Every guest, child and the namespace, by PID, in reverse order."""
        for g in self.guests:
            g.stop()
        for proc in reversed(self.children):
            stop_child(proc)
        self.netns.delete()
        self.other.delete()
