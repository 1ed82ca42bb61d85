"""The open-file table without a mount: handle numbers, open counts, locks, blob fd lifetime."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import trio
import trio.testing

from scratchfs.content import FileContent
from scratchfs.errors import FsError
from scratchfs.openfiles import OpenFileTable
from scratchfs.store import BlobStore
from scratchfs.tree import Inode


def _file(tmp_path: Path) -> Inode:
    node = Inode(2, stat.S_IFREG | 0o644, 0, 0, 0)
    node.content = FileContent(BlobStore.open(tmp_path), 4096)
    node.content.write(0, b"x")
    return node


def test_handles_are_distinct_and_count_opens(tmp_path: Path) -> None:
    table = OpenFileTable()
    node = _file(tmp_path)
    a = table.open(node, os.O_RDONLY)
    b = table.open(node, os.O_WRONLY)
    assert a != b
    assert node.opens == 2
    assert table.get(a).flags == os.O_RDONLY and table.get(b).node is node
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
    a = table.open(node, os.O_RDWR)
    b = table.open(node, os.O_RDWR)
    assert node.content.fd >= 0
    table.close(a)
    assert node.content.fd >= 0, "another handle still uses the fd"
    table.close(b)
    assert node.content.fd == -1


async def test_close_keeps_the_fd_while_a_lock_holder_uses_it(tmp_path: Path) -> None:
    table = OpenFileTable()
    node = _file(tmp_path)
    fh = table.open(node, os.O_RDWR)
    lock = table.lock(node)
    await lock.acquire_read()
    table.close(fh)
    assert node.content.fd >= 0, "a reader is still inside the blob"
    lock.release_read()
    node.content.close_fd()


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
    node.content.close_fd()


def test_clear_forgets_every_handle(tmp_path: Path) -> None:
    table = OpenFileTable()
    node = _file(tmp_path)
    fhs = [table.open(node, os.O_RDONLY) for _ in range(3)]
    assert len(table) == 3
    table.clear()
    assert len(table) == 0
    for fh in fhs:
        with pytest.raises(FsError):
            table.get(fh)
    node.content.close_fd()


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
    node.content.close_fd()
