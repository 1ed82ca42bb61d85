"""The open-file table without a mount: handle numbers, open counts, locks, blob fd lifetime."""

from __future__ import annotations

import errno
import stat
from pathlib import Path

import pytest
import trio
import trio.testing

from scratchfs.content import FileContent
from scratchfs.errors import FsError, IntegrityError
from scratchfs.locks import RWLock
from scratchfs.openfiles import OpenFileTable
from scratchfs.store import BlobStore
from scratchfs.tree import Inode


def _file(tmp_path: Path) -> Inode:
    node = Inode(2, stat.S_IFREG | 0o644, 0, 0, 0)
    node.content = FileContent(BlobStore.open(tmp_path), 4096)
    node.content.write(0, b"x")
    return node


def _content(node: Inode) -> FileContent:
    assert node.content is not None
    return node.content


def test_handles_are_distinct_and_count_opens(tmp_path: Path) -> None:
    table = OpenFileTable()
    node = _file(tmp_path)
    a = table.open(node)
    b = table.open(node, kill_suid=True)
    assert a != b
    assert node.opens == 2
    assert not table.get(a).kill_suid and table.get(b).kill_suid and table.get(b).node is node
    assert table.close(a) is node
    assert node.opens == 1
    with pytest.raises(FsError) as e:
        table.get(a)
    assert e.value.errno == errno.EBADF
    assert table.close(a) is None  # a second release of the same number changes nothing
    assert node.opens == 1


def test_last_close_closes_the_blob_fd(tmp_path: Path) -> None:
    table = OpenFileTable()
    node = _file(tmp_path)
    a = table.open(node)
    b = table.open(node)
    assert _content(node).fd >= 0
    table.close(a)
    assert _content(node).fd >= 0, "another handle still uses the fd"
    table.close(b)
    assert _content(node).fd == -1


async def test_close_keeps_the_fd_while_a_lock_holder_uses_it(tmp_path: Path) -> None:
    table = OpenFileTable()
    node = _file(tmp_path)
    fh = table.open(node)
    lock = table.lock(node)
    await lock.acquire_read()
    table.close(fh)
    assert _content(node).fd >= 0, "a reader is still inside the blob"
    lock.release_read()
    _content(node).close_fd()


async def test_lock_is_shared_per_inode_and_dropped_only_when_idle(tmp_path: Path) -> None:
    table = OpenFileTable()
    node = _file(tmp_path)
    other = Inode(3, stat.S_IFREG | 0o644, 0, 0, 0)
    lock = table.lock(node)
    assert table.lock(node) is lock
    assert table.lock(other) is not lock
    assert not table.busy(node)
    await lock.acquire_write()
    assert table.busy(node)
    table.forget_lock(node)
    assert table.lock(node) is lock, "a held lock must survive its inode's release"
    lock.release_write()
    table.forget_lock(node)
    assert table.lock(node) is not lock
    _content(node).close_fd()


def test_clear_forgets_every_handle(tmp_path: Path) -> None:
    table = OpenFileTable()
    node = _file(tmp_path)
    fhs = [table.open(node) for _ in range(3)]
    assert len(table) == 3
    table.clear()
    assert len(table) == 0
    for fh in fhs:
        with pytest.raises(FsError):
            table.get(fh)
    _content(node).close_fd()


async def test_writer_waits_for_reader_through_the_table(tmp_path: Path) -> None:
    table = OpenFileTable()
    node = _file(tmp_path)
    order: list[str] = []
    lock = table.lock(node)
    await lock.acquire_read()

    async def writer() -> None:
        await table.lock(node).acquire_write()
        order.append("write")
        table.lock(node).release_write()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        order.append("read done")
        lock.release_read()
    assert order == ["read done", "write"]
    _content(node).close_fd()


def _empty(tmp_path: Path) -> Inode:
    node = Inode(4, stat.S_IFREG | 0o644, 0, 0, 0)
    node.content = FileContent(BlobStore.open(tmp_path), 4096)
    return node


async def test_using_for_write_makes_the_blob_then_closes_its_fd(tmp_path: Path) -> None:
    table = OpenFileTable()
    node = _empty(tmp_path)
    async with table.using(node, write=True) as content:
        assert content is node.content
        assert content.blob_id is not None and content.fd >= 0, "the first write finds its blob ready"
        assert table.busy(node)
        content.write(0, b"hello")
    assert not table.busy(node)
    assert content.fd == -1, "no handle and no lock holder: the fd is closed"
    async with table.using(node, write=False) as again:
        assert again.fd >= 0, "reopened for the next use"
        assert again.read(0, 5) == b"hello"
    assert again.fd == -1


async def test_using_for_read_makes_no_blob(tmp_path: Path) -> None:
    table = OpenFileTable()
    node = _empty(tmp_path)
    async with table.using(node, write=False) as content:
        assert content.blob_id is None and content.fd == -1
        assert content.read(0, 10) == b""
    assert not table.busy(node)


async def test_using_keeps_the_fd_for_an_open_handle(tmp_path: Path) -> None:
    table = OpenFileTable()
    node = _file(tmp_path)
    fh = table.open(node)
    async with table.using(node, write=False) as content:
        pass
    assert content.fd >= 0, "a handle is open: the fd stays for its next request"
    table.close(fh)
    assert content.fd == -1


async def test_using_keeps_the_fd_while_another_holder_waits(tmp_path: Path) -> None:
    table = OpenFileTable()
    node = _file(tmp_path)
    assert node.content is not None
    _content(node).close_fd()
    seen: list[int] = []

    async def second() -> None:
        async with table.using(node, write=True) as content:
            seen.append(content.fd)

    async with trio.open_nursery() as nursery:
        async with table.using(node, write=True) as content:
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            first_fd = content.fd
        # released with a waiter: the fd was not closed under it
        assert content.fd == first_fd
    assert seen == [first_fd]
    assert content.fd == -1


async def test_using_releases_the_lock_when_the_body_fails(tmp_path: Path) -> None:
    table = OpenFileTable()
    node = _file(tmp_path)
    with pytest.raises(FsError):
        async with table.using(node, write=True):
            raise FsError(errno.EIO)
    assert not table.busy(node)
    assert node.content is not None and _content(node).fd == -1


async def test_using_a_missing_blob_fails_with_nothing_held(tmp_path: Path) -> None:
    table = OpenFileTable()
    node = _file(tmp_path)
    content = node.content
    assert content is not None and content.blob_id is not None
    content.close_fd()
    for path in tmp_path.rglob("*"):
        if path.is_file() and content.blob_id.hex() in path.name:
            path.unlink()
    with pytest.raises(IntegrityError):
        async with table.using(node, write=False):
            pytest.fail("the body must not run without the blob")
    assert not table.busy(node)
    assert content.fd == -1


def test_using_needs_content() -> None:
    table = OpenFileTable()
    node = Inode(5, stat.S_IFREG | 0o644, 0, 0, 0)
    with pytest.raises(ValueError):
        table.using(node, write=False)


async def test_rwlock_context_managers_share_reads_and_exclude_writes() -> None:
    lock = RWLock()
    order: list[str] = []

    async def writer() -> None:
        async with lock.write():
            order.append("write")

    async with trio.open_nursery() as nursery:
        async with lock.read():
            async with lock.read():
                assert not lock.idle
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            order.append("reads done")
    assert order == ["reads done", "write"]
    assert lock.idle


async def test_rwlock_context_manager_releases_on_error() -> None:
    lock = RWLock()
    with pytest.raises(RuntimeError):
        async with lock.write():
            raise RuntimeError("inside")
    assert lock.idle
