"""Model-based test: random operation sequences on the mount, checked against an in-memory model.

One mount per test function; every hypothesis example works in a fresh subdirectory and closes
its descriptors at teardown. Every read is compared byte for byte, and after every step the
size, link count and mode of every name and every open handle are compared with the model.
"""

from __future__ import annotations

import itertools
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from scratchfs.fallocate import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
from scratchfs.fallocate import fallocate as falloc
from tests.fs.conftest import Target
from tests.fs.helpers import errname, read_all, write_all

NAMES = ["a", "b", "c", "sub/d", "sub/e"]
MODES = [0o600, 0o644, 0o400, 0o755, 0o000]
FALLOCATE_MODES = [
    0,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_ZERO_RANGE,
    FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
]


@dataclass(eq=False)
class Inode:
    data: bytearray = field(default_factory=bytearray)
    nlink: int = 1
    mode: int = 0o644


@dataclass(eq=False)
class Handle:
    fd: int
    inode: Inode
    writable: bool


def make_machine(root: Path, block_size: int) -> type[RuleBasedStateMachine]:
    """Build the state machine class bound to one mounted directory."""
    counter = itertools.count()
    span = 3 * block_size + 100
    offsets = st.one_of(
        st.integers(0, span),
        st.sampled_from([block_size - 1, block_size, 2 * block_size - 3, 3 * block_size]),
    )
    lengths = st.one_of(st.integers(0, 300), st.sampled_from([block_size, block_size + 2]))

    class FsMachine(RuleBasedStateMachine):
        handles = Bundle("handles")

        def __init__(self) -> None:
            super().__init__()
            self.dir = root / f"ex{next(counter)}"
            os.makedirs(self.dir / "sub")
            self.names: dict[str, Inode] = {}
            self.open: list[Handle] = []

        def path(self, name: str) -> Path:
            return self.dir / name

        def add_handle(self, fd: int, inode: Inode, writable: bool) -> Handle:
            h = Handle(fd, inode, writable)
            if fd >= 0:
                self.open.append(h)
            return h

        @rule(target=handles, name=st.sampled_from(NAMES), mode=st.sampled_from(MODES))
        def create(self, name: str, mode: int) -> Handle:
            # Root opens files of any mode, so the mode does not constrain later rules.
            fd = os.open(self.path(name), os.O_CREAT | os.O_RDWR, mode)
            if name not in self.names:
                self.names[name] = Inode(mode=mode)
            return self.add_handle(fd, self.names[name], True)

        @rule(target=handles, name=st.sampled_from(NAMES), trunc=st.booleans(),
              rdonly=st.booleans())
        def open_existing(self, name: str, trunc: bool, rdonly: bool) -> Handle:
            trunc = trunc and not rdonly
            flags = (os.O_RDONLY if rdonly else os.O_RDWR) | (os.O_TRUNC if trunc else 0)
            if name not in self.names:
                assert errname(lambda: os.open(self.path(name), flags)) == "ENOENT"
                return self.add_handle(-1, Inode(nlink=0), False)
            fd = os.open(self.path(name), flags)
            inode = self.names[name]
            if trunc:
                inode.data.clear()
            return self.add_handle(fd, inode, not rdonly)

        @rule(h=handles, offset=offsets, length=lengths, seed=st.integers(0, 255))
        def write(self, h: Handle, offset: int, length: int, seed: int) -> None:
            if h.fd < 0 or not h.writable:
                return
            data = bytes((seed + i) % 251 for i in range(length))
            write_all(h.fd, data, offset)
            if length:
                d = h.inode.data
                if len(d) < offset:
                    d += bytes(offset - len(d))
                d[offset : offset + length] = data

        @rule(h=handles, offset=offsets, length=st.integers(0, 3 * 65536))
        def read(self, h: Handle, offset: int, length: int) -> None:
            if h.fd < 0:
                return
            got = read_all(h.fd, length, offset)
            assert got == bytes(h.inode.data[offset : offset + length])

        @rule(h=handles, size=offsets)
        def truncate(self, h: Handle, size: int) -> None:
            if h.fd < 0 or not h.writable:
                return
            os.ftruncate(h.fd, size)
            d = h.inode.data
            if size < len(d):
                del d[size:]
            else:
                d += bytes(size - len(d))

        @rule(h=handles, mode=st.sampled_from(FALLOCATE_MODES), offset=offsets,
              length=st.one_of(st.integers(1, 300), st.sampled_from([block_size, 2 * block_size + 1])))
        def fallocate(self, h: Handle, mode: int, offset: int, length: int) -> None:
            if h.fd < 0:
                return
            result = errname(lambda: falloc(h.fd, mode, offset, length))
            if not h.writable:
                assert result == "EBADF"
                return
            assert result == "ok"
            d = h.inode.data
            end = offset + length
            if not mode & FALLOC_FL_KEEP_SIZE and end > len(d):
                d += bytes(end - len(d))
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                stop = min(end, len(d))
                if offset < stop:
                    d[offset:stop] = bytes(stop - offset)

        @rule(h=handles, data_only=st.booleans())
        def sync(self, h: Handle, data_only: bool) -> None:
            if h.fd < 0:
                return
            (os.fdatasync if data_only else os.fsync)(h.fd)

        @rule(h=consumes(handles))
        def close(self, h: Handle) -> None:
            if h.fd >= 0:
                os.close(h.fd)
                self.open.remove(h)

        @rule(src=st.sampled_from(NAMES), dst=st.sampled_from(NAMES))
        def rename(self, src: str, dst: str) -> None:
            result = errname(lambda: os.rename(self.path(src), self.path(dst)))
            if src not in self.names:
                assert result == "ENOENT"
                return
            assert result == "ok"
            moving = self.names[src]
            if src == dst or self.names.get(dst) is moving:
                return  # same file: POSIX rename does nothing
            old = self.names.pop(dst, None)
            if old is not None:
                old.nlink -= 1
            self.names[dst] = self.names.pop(src)

        @rule(src=st.sampled_from(NAMES), dst=st.sampled_from(NAMES))
        def link(self, src: str, dst: str) -> None:
            result = errname(lambda: os.link(self.path(src), self.path(dst)))
            if src not in self.names:
                assert result == "ENOENT"
            elif dst in self.names:
                assert result == "EEXIST"
            else:
                assert result == "ok"
                self.names[dst] = self.names[src]
                self.names[dst].nlink += 1

        @rule(name=st.sampled_from(NAMES))
        def unlink(self, name: str) -> None:
            result = errname(lambda: os.unlink(self.path(name)))
            if name not in self.names:
                assert result == "ENOENT"
                return
            assert result == "ok"
            self.names.pop(name).nlink -= 1

        @precondition(lambda self: bool(self.names))
        @rule(data=st.data(), mode=st.sampled_from(MODES))
        def chmod(self, data: st.DataObject, mode: int) -> None:
            name = data.draw(st.sampled_from(sorted(self.names)))
            os.chmod(self.path(name), mode)
            self.names[name].mode = mode

        @invariant()
        def names_match(self) -> None:
            listed = set(os.listdir(self.dir)) - {"sub"}
            listed |= {f"sub/{n}" for n in os.listdir(self.dir / "sub")}
            assert listed == set(self.names)
            for name, inode in self.names.items():
                s = os.stat(self.path(name))
                assert stat.S_ISREG(s.st_mode)
                assert (s.st_size, s.st_nlink, stat.S_IMODE(s.st_mode)) == (
                    len(inode.data), inode.nlink, inode.mode
                ), name

        @invariant()
        def handles_match(self) -> None:
            for h in self.open:
                s = os.fstat(h.fd)
                assert (s.st_size, s.st_nlink, stat.S_IMODE(s.st_mode)) == (
                    len(h.inode.data), h.inode.nlink, h.inode.mode
                )

        def teardown(self) -> None:
            for h in self.open:
                os.close(h.fd)
            self.open.clear()
            # Full contents once more, through fresh descriptors.
            for name, inode in self.names.items():
                assert self.path(name).read_bytes() == bytes(inode.data), name

    return FsMachine


def test_model(fs: Target) -> None:
    machine = make_machine(fs.root, fs.block_size)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=30,
            stateful_step_count=40,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
