"""What the platform server asks of the operating system: more file descriptors, deferred
accepts, a non-blocking look at a new socket, and freed heap given back. Linux and glibc
where it matters; each call degrades to doing nothing elsewhere."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import resource
import select
import socket

import trio

log = logging.getLogger("scanner-platform")


def raise_fd_limit(wanted: int) -> None:
    """Raise the soft open-file limit towards *wanted* (Debian's default soft limit, 1024,
    is below the connection pool; the hard limit is the ceiling we may reach alone)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("event=fd_limit_raised soft=%d", target)


def defer_accept(listener: trio.SocketListener, seconds: float) -> bool:
    """Ask the kernel to defer accepting silent connections; True if it will.

    TCP_DEFER_ACCEPT (Linux): the kernel hands us a connection only once its first bytes
    arrived (a TLS client speaks first: the ClientHello), or after about *seconds*. Silent
    connections then wait in the kernel's SYN-RECV state instead of in our accept queue,
    where every legitimate client would queue behind them.
    """
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is None:
        return False
    try:
        listener.socket.setsockopt(socket.IPPROTO_TCP, option, max(1, math.ceil(seconds)))
    except OSError as e:
        log.warning("event=defer_accept_unavailable error=%s", e.strerror or type(e).__name__)
        return False
    return True


def silent(conn: socket.socket) -> bool:
    """True if the peer has sent nothing yet (nothing to read, no EOF)."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return not poller.poll(0)


def malloc_trim() -> bool:
    """Ask glibc to return free heap pages to the system (False where there is no glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))
