"""Build the pyfuse3 wheel scratchfs runs on: PyPI's 3.5.0 sdist plus two patches.

third_party/pyfuse3/ holds them (its README says why): fallocate.patch adds the FALLOCATE
handler pyfuse3 3.5.0 lacks (without it the kernel answers every fallocate(2) on the mount with
EOPNOTSUPP itself); direct-read.patch makes the request loop read the next request without a
pass through trio's scheduler when one is queued or arrives within a short spin. This module
downloads the sdist with pip, checks it against a pinned sha256, applies the patches in order,
deletes the C file Cython generated for the release (so the build really re-cythonizes the
patched .pyx/.pxi) and builds a wheel with a local version label into build/pyfuse3/<label>/.
pyproject.toml pins exactly that version; `make setup` and the appliance build install it with
`--find-links` to that directory.

Idempotent: a wheel already in the directory is reused. The local label is tied to the patches'
hashes: changing a patch without bumping LOCAL_LABEL (and its hash in PATCHES) is an error, so a
venv never keeps an old build under the same version.

Run as `python -m tools.patched_pyfuse3` (stdlib only: it runs before the project is installed);
it prints the wheel directory. Exit 1 with one line on stderr on failure.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_VERSION = "3.5.0"
SDIST_NAME = f"pyfuse3-{UPSTREAM_VERSION}.tar.gz"
# sha256 of PyPI's pyfuse3-3.5.0.tar.gz (the "Download files" page lists the same digest).
SDIST_SHA256 = "88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24"
PATCH_DIR = ROOT / "third_party" / "pyfuse3"
# (patch, its sha256), applied in this order.
PATCHES = (
    (PATCH_DIR / "fallocate.patch", "64f95023f1f12928c3e886c5e4271dfcaa9cfed6808cc39ab13724cb2814b8f3"),
    (PATCH_DIR / "direct-read.patch", "7e00a3a599fe8599e23eb649f9f42c08f634a34dbc4ee04d130749340905bb3e"),
)
LOCAL_LABEL = "scratchfs.3"
VERSION = f"{UPSTREAM_VERSION}+{LOCAL_LABEL}"
CACHE = ROOT / "build" / "pyfuse3"
BUILD_TIMEOUT_S = 900


class BuildError(Exception):
    """The patched wheel could not be built; the message says what to do."""


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wheel_dir() -> Path:
    """Where the wheel for this patch lives (one directory per local label)."""
    return CACHE / LOCAL_LABEL


def existing_wheel(directory: Path) -> Path | None:
    """The already built wheel of VERSION in *directory*, if there is one."""
    # Wheel file names escape '+' nowhere; the local label is part of the version field.
    found = sorted(directory.glob(f"pyfuse3-{VERSION}-*.whl"))
    return found[-1] if found else None


def run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    """Run a build step; its output goes to our stderr, a failure becomes a BuildError."""
    try:
        subprocess.run([str(a) for a in args], cwd=cwd, env=env, check=True, timeout=BUILD_TIMEOUT_S,
                       stdout=sys.stderr)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        raise BuildError(f"{args[0]} {args[1] if len(args) > 1 else ''} failed ({exc})") from None


def download_sdist(dest: Path) -> Path:
    """The release sdist from the package index, verified against SDIST_SHA256."""
    run(sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
        "--dest", dest, f"pyfuse3=={UPSTREAM_VERSION}")
    sdist = dest / SDIST_NAME
    if not sdist.is_file():
        raise BuildError(f"pip download did not produce {SDIST_NAME}")
    digest = sha256_of(sdist)
    if digest != SDIST_SHA256:
        raise BuildError(f"{SDIST_NAME} has sha256 {digest}, expected {SDIST_SHA256}: refusing to build it")
    return sdist


def unpack(sdist: Path, dest: Path) -> Path:
    """Unpack the sdist (regular files and directories only) and return its top directory."""
    with tarfile.open(sdist) as tar:
        members = tar.getmembers()
        for member in members:
            # Checked by hand as well: Python before 3.11.4 has no extraction filters.
            if not (member.isfile() or member.isdir()) or member.name.startswith("/") or ".." in member.name.split("/"):
                raise BuildError(f"{SDIST_NAME} has an unexpected member {member.name!r}")
        tar.extractall(dest, members=members)  # noqa: S202 (members checked above)
    top = dest / f"pyfuse3-{UPSTREAM_VERSION}"
    if not (top / "src" / "pyfuse3" / "handlers.pxi").is_file():
        raise BuildError(f"{SDIST_NAME} does not have the expected layout")
    return top


def patch_source(top: Path) -> None:
    """Apply the patches and drop the release's generated C so Cython regenerates it."""
    for patch, _ in PATCHES:
        run("patch", "-p1", "--forward", "--batch", "--input", patch, cwd=top)
    generated_c = top / "src" / "pyfuse3" / "__init__.c"
    generated_c.unlink(missing_ok=True)


def build_wheel(top: Path, out: Path) -> Path:
    """Build the wheel (Cython and setuptools come through pip's build isolation)."""
    env = dict(os.environ)
    # setuptools_scm takes the version from here; the local label marks our build.
    env["SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3"] = VERSION
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir", "--wheel-dir", out, top,
        env=env)
    wheel = existing_wheel(out)
    if wheel is None:
        raise BuildError(f"pip wheel did not produce pyfuse3-{VERSION}")
    return wheel


def ensure_wheel() -> Path:
    """The patched wheel's directory, building the wheel unless it is already there."""
    for patch, expected in PATCHES:
        digest = sha256_of(patch)
        if digest != expected:
            raise BuildError(f"{patch.relative_to(ROOT)} changed (sha256 {digest}): bump LOCAL_LABEL and "
                             "its hash in PATCHES in tools/patched_pyfuse3.py and the pin in pyproject.toml")
    out = wheel_dir()
    if existing_wheel(out) is not None:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pyfuse3-build-", dir=out.parent) as tmp:
        work = Path(tmp)
        top = unpack(download_sdist(work / "sdist"), work / "src")
        patch_source(top)
        staging = work / "wheel"
        build_wheel(top, staging)
        # Move into place only when complete, so an interrupted build never looks finished.
        partial = out.parent / f".{LOCAL_LABEL}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        staging.rename(partial)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    return out


def main() -> int:
    """Print the wheel directory; one line on stderr and exit 1 on failure."""
    try:
        print(ensure_wheel())
    except BuildError as exc:
        print(f"patched pyfuse3: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
