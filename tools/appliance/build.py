"""``make appliance``: the appliance's bootable raw disk, from Debian packages and this project.

    python -m tools.appliance.build [--out build/appliance.raw]

Layers, each cached by a hash of its inputs (docs/appliance.md):

1. the Debian base (``mmdebstrap`` of deploy/appliance/packages.txt) as a tar file in
   build/cache/, keyed by the package list, suite and mirror;
2. the image: the base, the project's wheels installed into /opt/scanner-agent/.venv, the
   agent's unit (deploy/systemd/scanner-agent.service, the very file), the files of
   deploy/appliance/rootfs, locked accounts and masked consoles; then a GPT disk with an EFI
   system partition (standalone GRUB, kernel, initrd, GRUB config), a read-only ext4 root
   and an empty ext4 state partition. Keyed by every input file's path and content.

A warm run (nothing changed) only hashes the inputs. Needs root (chroot, device nodes in
the base, file ownership in the root file system), but no loop device, no mount and no
vfat module: the ESP is written with mtools, partitions are placed by offset.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tools.patched_pyfuse3 import BuildError as PyfuseBuildError
from tools.patched_pyfuse3 import ensure_wheel as patched_pyfuse3_wheels

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy" / "appliance"
UNIT_FILE = ROOT / "deploy" / "systemd" / "scanner-agent.service"
SUITE = "bookworm"
MIRROR = os.environ.get("APPLIANCE_MIRROR", "http://deb.debian.org/debian")
MiB = 1024 * 1024
SECTOR = 512

# Fixed GPT identifiers: the kernel command line names the root by PARTUUID.
DISK_GUID = "6a1f2c9e-4b7d-4e0a-9c55-2f0d1e8b7a10"
ESP_PARTUUID = "6a1f2c9e-4b7d-4e0a-9c55-2f0d1e8b7a11"
ROOT_PARTUUID = "6a1f2c9e-4b7d-4e0a-9c55-2f0d1e8b7a12"
STATE_PARTUUID = "6a1f2c9e-4b7d-4e0a-9c55-2f0d1e8b7a13"
TYPE_ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
TYPE_ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
TYPE_LINUX_DATA = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"

ESP_SIZE = 128 * MiB
STATE_SIZE = 512 * MiB  # the agent's state (KBs) and its volume image (256 MiB by default)

# The project files that go into the image (through its wheel) or shape it.
PROJECT_INPUTS = ("agent", "scratchfs", "protocol", "tools", "third_party", "pyproject.toml", "setup.cfg",
                  "deploy", "docs/agent.md")

ENABLED_UNITS = ("systemd-networkd.service", "systemd-networkd-wait-online.service", "nftables.service",
                 "scanner-agent.service", "appliance-provision.service", "appliance-lock-modules.service",
                 "appliance-report.service")
# No console login of any kind, no emergency or debug shell; no writer of the read-only root.
MASKED_UNITS = ("getty@.service", "serial-getty@.service", "console-getty.service", "container-getty@.service",
                "autovt@.service", "getty.target", "debug-shell.service", "emergency.service",
                "emergency.target", "rescue.service", "rescue.target", "systemd-random-seed.service",
                "systemd-update-utmp.service", "systemd-update-utmp-runlevel.service", "apt-daily.timer",
                "apt-daily-upgrade.timer", "e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer")
GRUB_MODULES = "normal configfile search search_fs_file part_gpt fat linux tpm boot gzio echo test"


class BuildError(RuntimeError):
    """The image could not be built (the message says which step and why)."""


@dataclass(frozen=True)
class Paths:
    """Where the build writes."""

    out: Path

    @property
    def build(self) -> Path:
        return self.out.parent

    @property
    def cache(self) -> Path:
        return self.build / "cache"

    @property
    def work(self) -> Path:
        return self.build / "appliance.work"

    @property
    def stamp(self) -> Path:
        return self.out.with_name(self.out.name + ".inputs")


def sh(*args: str | Path, input_: bytes | None = None, timeout: float = 1800) -> str:
    """Run a command; raise BuildError with the end of its stderr when it fails."""
    argv = [str(a) for a in args]
    proc = subprocess.run(argv, input=input_, capture_output=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-1500:]
        raise BuildError(f"{' '.join(argv[:3])} exited {proc.returncode}: {err}")
    return proc.stdout.decode(errors="replace")


def packages() -> list[str]:
    """The image's Debian packages (deploy/appliance/packages.txt)."""
    lines = (DEPLOY / "packages.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def initramfs_modules() -> list[str]:
    """The modules of the initramfs (deploy/appliance/initramfs-modules)."""
    lines = (DEPLOY / "initramfs-modules").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def base_hooks() -> list[str]:
    """mmdebstrap hooks of the base: a small initramfs (MODULES=list) rebuilt with /proc and /dev."""
    modules = " ".join(initramfs_modules())
    return [
        '--customize-hook=echo MODULES=list > "$1/etc/initramfs-tools/conf.d/appliance.conf"',
        f'--customize-hook=printf "%s\\n" {modules} >> "$1/etc/initramfs-tools/modules"',
        '--customize-hook=chroot "$1" update-initramfs -u -k all',
    ]


def base_key() -> str:
    """Cache key of the Debian base layer."""
    material = json.dumps([SUITE, MIRROR, packages(), base_hooks()])
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def project_files() -> list[Path]:
    """Every input file of the image layer (tracked or not, ignoring what git ignores)."""
    out = sh("git", "-C", ROOT, "ls-files", "-co", "--exclude-standard", "-z", "--", *PROJECT_INPUTS)
    files = sorted({ROOT / p for p in out.split("\0") if p})
    return [f for f in files if f.is_file() and "__pycache__" not in f.parts]


def image_key() -> str:
    """Cache key of the image: the base key and every project input's path and content."""
    h = hashlib.sha256(base_key().encode())
    for f in project_files():
        h.update(str(f.relative_to(ROOT)).encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def build_base(paths: Paths) -> Path:
    """The Debian base as a tar file (cached)."""
    tar = paths.cache / f"base-{base_key()}.tar"
    if tar.exists():
        return tar
    paths.cache.mkdir(parents=True, exist_ok=True)
    tmp = tar.with_suffix(".tmp.tar")
    started = time.monotonic()
    print(f"appliance: mmdebstrap {SUITE} ({len(packages())} packages) ...", flush=True)
    sh("mmdebstrap", "--variant=minbase", "--include=" + ",".join(packages()),
       "--aptopt=Acquire::Retries 3", "--dpkgopt=path-exclude=/usr/share/doc/*",
       "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/locale/*",
       *base_hooks(), SUITE, tmp, MIRROR)
    tmp.rename(tar)
    for old in paths.cache.glob("base-*.tar"):
        if old != tar:
            old.unlink()
    print(f"appliance: base layer in {time.monotonic() - started:.0f} s", flush=True)
    return tar


def build_wheels(paths: Paths) -> Path:
    """Wheels of the project and its dependencies, for the image's Python (same 3.11 ABI)."""
    wheels = paths.work / "wheels"
    wheels.mkdir(parents=True)
    py = sys.executable
    # pyfuse3 is our patched build (third_party/pyfuse3): the same wheel `make setup` installs.
    try:
        patched_pyfuse3 = patched_pyfuse3_wheels()
    except PyfuseBuildError as e:
        raise BuildError(str(e)) from None
    sh(py, "-m", "pip", "wheel", "-q", "--find-links", patched_pyfuse3, "--wheel-dir", wheels, ROOT, timeout=1800)
    sh(py, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--dest", wheels / "pip", "pip")
    return wheels


def chroot(root: Path, *args: str) -> str:
    """Run a command inside the image's root (no /proc or /dev mounted: none of them needs one)."""
    return sh("chroot", root, *args)


def install_project(root: Path, wheels: Path) -> None:
    """The project's virtualenv in /opt/scanner-agent/.venv, installed by pip run from its wheel.

    The venv gets no pip of its own: nothing on the appliance installs packages.
    """
    inside = root / "tmp" / "wheels"
    shutil.copytree(wheels, inside)
    try:
        chroot(root, "python3", "-m", "venv", "--without-pip", "/opt/scanner-agent/.venv")
        [pip_wheel] = (inside / "pip").glob("pip-*.whl")
        chroot(root, "/opt/scanner-agent/.venv/bin/python", f"/tmp/wheels/pip/{pip_wheel.name}/pip", "install",
               "-q", "--no-index", "--no-cache-dir", "--find-links", "/tmp/wheels", "--no-compile", "scratchfs")
        chroot(root, "/opt/scanner-agent/.venv/bin/python", "-m", "compileall", "-q",
               "/opt/scanner-agent/.venv/lib")
    finally:
        shutil.rmtree(inside)
    docs = root / "opt" / "scanner-agent" / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "docs" / "agent.md", docs / "agent.md")


def copy_tree(src: Path, dst: Path) -> None:
    """Copy deploy/appliance/rootfs into the image, root-owned, keeping modes."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        os.chown(target, 0, 0)


def lock_down(root: Path) -> None:
    """Accounts without shells or passwords, no setuid bits, no consoles, the units enabled."""
    passwd = root / "etc" / "passwd"
    rows = []
    for line in passwd.read_text().splitlines():
        fields = line.split(":")
        fields[6] = "/usr/sbin/nologin"
        rows.append(":".join(fields))
    passwd.write_text("\n".join(rows) + "\n")
    shadow = root / "etc" / "shadow"
    rows = []
    for line in shadow.read_text().splitlines():
        fields = line.split(":")
        fields[1] = "!*"  # locked, and no password could ever match
        rows.append(":".join(fields))
    shadow.write_text("\n".join(rows) + "\n")
    for path in root.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        mode = path.stat().st_mode
        if mode & 0o6000:
            os.chmod(path, mode & ~0o6000)
    shutil.copy2(UNIT_FILE, root / "etc" / "systemd" / "system" / "scanner-agent.service")
    chroot(root, "systemctl", "enable", *ENABLED_UNITS)
    chroot(root, "systemctl", "mask", *MASKED_UNITS)
    chroot(root, "systemctl", "set-default", "multi-user.target")
    (root / "etc" / "hostname").write_text("appliance\n")
    (root / "etc" / "machine-id").write_text("")  # a new one (in /run) at every boot
    (root / "etc" / "fstab").write_text(
        "# The root is read-only; the agent's state partition is the only persistent writable place.\n"
        f"PARTUUID={ROOT_PARTUUID} / ext4 ro,nodev 0 0\n"
        # A slow boot (TCG on a busy host) can take minutes to coldplug the disk.
        f"PARTUUID={STATE_PARTUUID} /var/lib/scanner-agent ext4 "
        "nodev,nosuid,noexec,x-systemd.device-timeout=15min 0 0\n"
        "tmpfs /tmp tmpfs nodev,nosuid,noexec,mode=1777,size=64m 0 0\n"
        "tmpfs /var/tmp tmpfs nodev,nosuid,noexec,mode=1777,size=16m 0 0\n"
    )
    (root / "var" / "lib" / "scanner-agent").mkdir(mode=0o700, exist_ok=True)
    for leftover in ("var/cache/apt", "var/lib/apt/lists"):
        shutil.rmtree(root / leftover, ignore_errors=True)
        (root / leftover).mkdir(parents=True, exist_ok=True)


def kernel_files(root: Path) -> tuple[Path, Path]:
    """The image's kernel and initrd (from its linux-image package)."""
    [kernel] = sorted((root / "boot").glob("vmlinuz-*"))
    initrd = root / "boot" / ("initrd.img-" + kernel.name.removeprefix("vmlinuz-"))
    if not initrd.exists():
        raise BuildError(f"no initrd next to {kernel.name}: did initramfs-tools run in the base?")
    return kernel, initrd


def build_esp(work: Path, kernel: Path, initrd: Path) -> Path:
    """The EFI system partition as a FAT file: standalone GRUB, its config, kernel, initrd."""
    efi = work / "BOOTX64.EFI"
    sh("grub-mkstandalone", "-O", "x86_64-efi", "--install-modules=" + GRUB_MODULES, "--modules=" + GRUB_MODULES,
       "--locales=", "--fonts=", "--themes=", "-o", efi, f"boot/grub/grub.cfg={DEPLOY / 'grub-embedded.cfg'}")
    cmdline = (DEPLOY / "cmdline.txt").read_text().strip()
    cfg = work / "grub.cfg"
    cfg.write_text((DEPLOY / "grub.cfg").read_text().replace("@ROOT_PARTUUID@", ROOT_PARTUUID)
                   .replace("@CMDLINE@", cmdline))
    esp = work / "esp.img"
    sh("mkfs.vfat", "-C", "-n", "ESP", "-i", "6a1f2c9e", esp, str(ESP_SIZE // 1024))
    sh("mmd", "-i", esp, "::/EFI", "::/EFI/BOOT", "::/EFI/appliance")
    sh("mcopy", "-i", esp, efi, "::/EFI/BOOT/BOOTX64.EFI")
    sh("mcopy", "-i", esp, cfg, "::/EFI/appliance/grub.cfg")
    sh("mcopy", "-i", esp, kernel, "::/EFI/appliance/vmlinuz")
    sh("mcopy", "-i", esp, initrd, "::/EFI/appliance/initrd.img")
    return esp


def du_bytes(root: Path) -> int:
    """Apparent size of a tree."""
    return int(sh("du", "-sb", root).split()[0])


def assemble(paths: Paths, esp: Path, root_img: Path, state_img: Path) -> None:
    """The GPT disk: ESP, root, state, placed by offset (no loop device)."""
    sizes = [esp.stat().st_size, root_img.stat().st_size, state_img.stat().st_size]
    starts = [MiB]
    for size in sizes[:-1]:
        starts.append(starts[-1] + size)
    total = starts[-1] + sizes[-1] + MiB
    tmp = paths.out.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with open(tmp, "wb") as f:
        f.truncate(total)
    parts = [(TYPE_ESP, ESP_PARTUUID, "esp"), (TYPE_ROOT_X86_64, ROOT_PARTUUID, "root"),
             (TYPE_LINUX_DATA, STATE_PARTUUID, "state")]
    script = f"label: gpt\nlabel-id: {DISK_GUID}\nunit: sectors\n"
    for (ptype, uuid, name), start, size in zip(parts, starts, sizes, strict=True):
        script += f"start={start // SECTOR}, size={size // SECTOR}, type={ptype}, uuid={uuid}, name={name}\n"
    sh("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", tmp, input_=script.encode())
    for img, start in zip((esp, root_img, state_img), starts, strict=True):
        sh("dd", f"if={img}", f"of={tmp}", "bs=1M", f"seek={start // MiB}", "conv=notrunc,sparse", "status=none")
    tmp.rename(paths.out)


def build_image(paths: Paths) -> None:
    """Every layer; the result replaces paths.out atomically."""
    base = build_base(paths)
    shutil.rmtree(paths.work, ignore_errors=True)
    paths.work.mkdir(parents=True)
    try:
        root = paths.work / "root"
        root.mkdir()
        sh("tar", "--numeric-owner", "-xpf", base, "-C", root)
        wheels = build_wheels(paths)
        install_project(root, wheels)
        copy_tree(DEPLOY / "rootfs", root)
        lock_down(root)
        kernel, initrd = kernel_files(root)
        esp = build_esp(paths.work, kernel, initrd)
        root_size = (du_bytes(root) * 5 // 4 // MiB + 128) * MiB
        root_img = paths.work / "root.img"
        sh("mke2fs", "-q", "-t", "ext4", "-L", "root", "-m", "0", "-E", "root_owner=0:0", "-d", root,
           root_img, f"{root_size // 1024}k")
        state_img = paths.work / "state.img"
        sh("mke2fs", "-q", "-t", "ext4", "-L", "state", "-m", "0", "-E", "root_owner=0:0", state_img,
           f"{STATE_SIZE // 1024}k")
        assemble(paths, esp, root_img, state_img)
    finally:
        shutil.rmtree(paths.work, ignore_errors=True)


def require_tools() -> None:
    """Every host tool the build runs (installed by ``make appliance``)."""
    missing = [t for t in ("mmdebstrap", "mke2fs", "mkfs.vfat", "mcopy", "mmd", "sfdisk", "grub-mkstandalone",
                           "chroot") if shutil.which(t) is None]
    if missing:
        raise BuildError(f"missing tools: {' '.join(missing)}; run 'make appliance' (it installs them)")
    if os.geteuid() != 0:
        raise BuildError("building the image needs root (chroot, device nodes, file ownership)")


def build(out: Path) -> bool:
    """Build *out* unless its inputs are unchanged; return True when it was (re)built.

    One build at a time per output (an exclusive lock next to it): a second ``make
    appliance`` waits, then finds the image current.
    """
    require_tools()
    paths = Paths(out.absolute())
    paths.build.mkdir(parents=True, exist_ok=True)
    with open(paths.out.with_name(paths.out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        key = image_key()
        if paths.out.exists() and paths.stamp.exists() and paths.stamp.read_text().strip() == key:
            return False
        paths.stamp.unlink(missing_ok=True)
        build_image(paths)
        paths.stamp.write_text(key + "\n")
    return True


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build (or reuse) the image and print its path."""
    parser = argparse.ArgumentParser(prog="python -m tools.appliance.build", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "appliance.raw",
                        help="where the raw disk image goes (default: build/appliance.raw)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        built = build(args.out)
    except BuildError as e:
        print(f"appliance: {e}", file=sys.stderr)
        return 1
    how = "built" if built else "unchanged (inputs hash matches)"
    size = args.out.stat().st_size
    print(f"appliance: {how} in {time.monotonic() - started:.1f} s; {size / MiB:.0f} MiB raw disk", file=sys.stderr)
    print(args.out.absolute())
    return 0


if __name__ == "__main__":
    sys.exit(main())
