"""Model-based test with concurrency: several handles, hard links, renames over open files, races.

A hypothesis state machine drives one live mount (4 KiB blocks) and an in-memory model. Besides
sequential operations it runs two operations at once on two threads released by one barrier
(write vs truncate, write vs write, read vs write). The filesystem may serialise a race either
way; the outcome must then be exactly one of the two serial outcomes, never a mix, and the model
adopts whichever happened. After every step each name's size and link count, each open handle's
size and link count, and every inode's full content are compared with the model.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from tests.mounting import Mounted

BS = 4096
NAMES = ["a", "b", "c", "d"]
offsets = st.one_of(st.integers(0, 3 * BS + 100), st.sampled_from([BS - 1, BS, 2 * BS - 3, 3 * BS]))
payloads = st.one_of(st.binary(min_size=1, max_size=300), st.integers(1, 2 * BS + 5).map(os.urandom))
sizes = st.one_of(st.integers(0, 4 * BS), st.sampled_from([0, BS, BS + 1, 2 * BS - 1]))


@dataclass(eq=False)
class Inode:
    data: bytearray = field(default_factory=bytearray)
    nlink: int = 1


@dataclass(eq=False)
class Handle:
    fd: int
    inode: Inode


def _written(data: bytearray, offset: int, payload: bytes) -> bytearray:
    out = bytearray(data)
    if offset > len(out):
        out.extend(bytes(offset - len(out)))
    out[offset : offset + len(payload)] = payload
    return out


def _truncated(data: bytearray, size: int) -> bytearray:
    return bytearray(data[:size]) if size <= len(data) else data + bytes(size - len(data))


def _race(first: Callable[[], object], second: Callable[[], object]) -> list[object]:
    """Run two calls at once (released together by a barrier); returns their results in order."""
    barrier = threading.Barrier(2)
    results: list[object] = [None, None]
    errors: list[BaseException] = []

    def run(i: int, fn: Callable[[], object]) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate((first, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a racing operation hung"
    if errors:
        raise errors[0]
    return results


def make_machine(root: Path) -> type[RuleBasedStateMachine]:
    counter = itertools.count()

    class ConcurrentFs(RuleBasedStateMachine):
        handles = Bundle("handles")

        def __init__(self) -> None:
            super().__init__()
            self.dir = root / f"ex{next(counter)}"
            self.dir.mkdir()
            self.names: dict[str, Inode] = {}
            self.open: list[Handle] = []

        def path(self, name: str) -> Path:
            return self.dir / name

        def _handle(self, fd: int, inode: Inode) -> Handle:
            h = Handle(fd, inode)
            self.open.append(h)
            return h

        def _live(self, h: Handle) -> bool:
            return h in self.open

        # --- handles -----------------------------------------------------------------------
        @rule(target=handles, name=st.sampled_from(NAMES))
        def open_or_create(self, name: str) -> Handle:
            fd = os.open(self.path(name), os.O_RDWR | os.O_CREAT, 0o644)
            inode = self.names.setdefault(name, Inode())
            return self._handle(fd, inode)

        @precondition(lambda self: bool(self.names))
        @rule(target=handles, data=st.data())
        def open_truncating(self, data: st.DataObject) -> Handle:
            name = data.draw(st.sampled_from(sorted(self.names)))
            fd = os.open(self.path(name), os.O_RDWR | os.O_TRUNC)
            inode = self.names[name]
            inode.data = bytearray()
            return self._handle(fd, inode)

        @rule(h=handles)
        def close(self, h: Handle) -> None:
            if self._live(h):
                os.close(h.fd)
                self.open.remove(h)

        # --- sequential content ops ----------------------------------------------------------
        @rule(h=handles, offset=offsets, payload=payloads)
        def write(self, h: Handle, offset: int, payload: bytes) -> None:
            if self._live(h):
                assert os.pwrite(h.fd, payload, offset) == len(payload)
                h.inode.data = _written(h.inode.data, offset, payload)

        @rule(h=handles, offset=offsets, length=st.integers(0, 2 * BS + 10))
        def read(self, h: Handle, offset: int, length: int) -> None:
            if self._live(h):
                assert os.pread(h.fd, length, offset) == bytes(h.inode.data[offset : offset + length])

        @rule(h=handles, size=sizes)
        def truncate(self, h: Handle, size: int) -> None:
            if self._live(h):
                os.ftruncate(h.fd, size)
                h.inode.data = _truncated(h.inode.data, size)

        # --- namespace ----------------------------------------------------------------------
        @rule(src=st.sampled_from(NAMES), dst=st.sampled_from(NAMES))
        def link(self, src: str, dst: str) -> None:
            if src in self.names and dst not in self.names:
                os.link(self.path(src), self.path(dst))
                inode = self.names[dst] = self.names[src]
                inode.nlink += 1

        @rule(src=st.sampled_from(NAMES), dst=st.sampled_from(NAMES))
        def rename(self, src: str, dst: str) -> None:
            """Rename, possibly over a name whose file is open: its handles keep the old inode."""
            if src not in self.names:
                return
            os.rename(self.path(src), self.path(dst))
            if src == dst or self.names[src] is self.names.get(dst):
                # POSIX: renaming onto a link of the same inode does nothing
                return
            replaced = self.names.get(dst)
            if replaced is not None:
                replaced.nlink -= 1
            self.names[dst] = self.names.pop(src)

        @rule(name=st.sampled_from(NAMES))
        def unlink(self, name: str) -> None:
            if name in self.names:
                os.unlink(self.path(name))
                self.names.pop(name).nlink -= 1

        # --- races --------------------------------------------------------------------------
        def _pair(self, data: st.DataObject) -> tuple[Handle, Handle]:
            """Two open handles (often on one inode, sometimes the very same handle)."""
            a = data.draw(st.sampled_from(self.open))
            same = [h for h in self.open if h.inode is a.inode]
            b = data.draw(st.sampled_from(same) if data.draw(st.integers(0, 3)) else st.sampled_from(self.open))
            return a, b

        @precondition(lambda self: bool(self.open))
        @rule(data=st.data(), offset=offsets, payload=payloads, size=sizes)
        def race_write_truncate(self, data: st.DataObject, offset: int, payload: bytes, size: int) -> None:
            a, b = self._pair(data)
            _race(lambda: os.pwrite(a.fd, payload, offset), lambda: os.ftruncate(b.fd, size))
            if a.inode is b.inode:
                inode = a.inode
                write_first = _truncated(_written(inode.data, offset, payload), size)
                trunc_first = _written(_truncated(inode.data, size), offset, payload)
                actual = bytearray(os.pread(a.fd, 8 * BS, 0))
                assert actual in (write_first, trunc_first), "write racing truncate left a mix of both"
                inode.data = actual
            else:
                a.inode.data = _written(a.inode.data, offset, payload)
                b.inode.data = _truncated(b.inode.data, size)

        @precondition(lambda self: bool(self.open))
        @rule(data=st.data(), off1=offsets, p1=payloads, off2=offsets, p2=payloads)
        def race_writes(self, data: st.DataObject, off1: int, p1: bytes, off2: int, p2: bytes) -> None:
            a, b = self._pair(data)
            _race(lambda: os.pwrite(a.fd, p1, off1), lambda: os.pwrite(b.fd, p2, off2))
            if a.inode is b.inode:
                one = _written(_written(a.inode.data, off1, p1), off2, p2)
                two = _written(_written(a.inode.data, off2, p2), off1, p1)
                actual = bytearray(os.pread(a.fd, 8 * BS, 0))
                assert actual in (one, two), "two racing writes were mixed"
                a.inode.data = actual
            else:
                a.inode.data = _written(a.inode.data, off1, p1)
                b.inode.data = _written(b.inode.data, off2, p2)

        @precondition(lambda self: bool(self.open))
        @rule(data=st.data(), page=st.integers(0, 3), payload=st.integers(1, BS).map(os.urandom))
        def race_read_write(self, data: st.DataObject, page: int, payload: bytes) -> None:
            """A read of one page racing a write of that page sees all of it before or all after."""
            a, b = self._pair(data)
            if a.inode is not b.inode:
                return
            inode = a.inode
            offset = page * BS
            if offset + len(payload) > len(inode.data):
                return  # growing the file while reading is a size race, not a content one
            before = bytes(inode.data[offset : offset + BS])
            after_data = _written(inode.data, offset, payload)
            after = bytes(after_data[offset : offset + BS])
            got, _ = _race(lambda: os.pread(b.fd, BS, offset), lambda: os.pwrite(a.fd, payload, offset))
            assert got in (before, after), "a read racing a write saw a torn page"
            inode.data = after_data

        # --- checks -------------------------------------------------------------------------
        @invariant()
        def names_match(self) -> None:
            for name, inode in self.names.items():
                st_ = os.stat(self.path(name))
                assert st_.st_size == len(inode.data), f"{name}: size {st_.st_size} != {len(inode.data)}"
                assert st_.st_nlink == inode.nlink, f"{name}: nlink {st_.st_nlink} != {inode.nlink}"
            listed = sorted(os.listdir(self.dir))
            assert listed == sorted(self.names), f"directory lists {listed}, model {sorted(self.names)}"

        @invariant()
        def handles_match(self) -> None:
            seen: set[int] = set()
            for h in self.open:
                st_ = os.fstat(h.fd)
                assert st_.st_size == len(h.inode.data)
                assert st_.st_nlink == h.inode.nlink
                if id(h.inode) not in seen:
                    seen.add(id(h.inode))
                    assert os.pread(h.fd, len(h.inode.data) + 10, 0) == bytes(h.inode.data), "content differs"

        def teardown(self) -> None:
            for h in self.open:
                os.close(h.fd)
            self.open.clear()

    return ConcurrentFs


def test_concurrent_model(mount_factory: Callable[..., Mounted]) -> None:
    m = mount_factory("--block-size", str(BS))
    machine = make_machine(m.mountpoint)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=25,
            stateful_step_count=40,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    assert "event=integrity_failure" not in m.log_text()
