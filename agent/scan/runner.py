"""The scan child process: read a job from scratch, scan, write the result to scratch.

Started by the agent as ``python -m agent.scan JOB_DIR ...`` so that a crash in scanning
code cannot take down the process that holds keys (DESIGN.md §3b). It never sees the
appliance's sealing key or a sealed blob. When a port asks for authentication, the child
writes one byte to ``--cred-request-fd``; only then does the agent open the sealed
credential and write its plaintext (the customer's sealed scope, then the secret; see
protocol.credential) to ``--cred-fd``, which the child reads straight into a bytearray.
The child enforces the sealed scope per (address, port, protocol) before sending anything
(agent.scan.credcheck), and overwrites the secret after the checks.

Exit codes: 0 result written, 1 scan failed (one line on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import trio

from agent.exitcodes import SCAN_FAILED, SCAN_OK, SCAN_USAGE
from agent.scan import nmap, tcp
from agent.scan.model import HostResult, ScanOptions, result_document
from agent.scan.targets import TargetError, resolve
from protocol import api
from scratchfs.keyholder import logformat
from scratchfs.keyholder.wipe import wipe

log = logging.getLogger("agent.scan")

JOB_FILE = "job.json"
RESULT_FILE = "result.json"
MAX_CREDENTIAL = 64 * 1024


class ScanFailed(Exception):
    """The scan could not run (the message is one line, never a secret)."""


def read_credential_fd(fd: int) -> bytearray:
    """Read the whole credential from *fd* into a bytearray (no immutable copies)."""
    buf = bytearray(MAX_CREDENTIAL)
    filled = 0
    while filled < len(buf):
        view = memoryview(buf)[filled:]
        n = os.readv(fd, [view])
        view.release()
        if n == 0:
            break
        filled += n
    out = bytearray(buf[:filled])
    wipe(buf)
    return out


def make_credential_source(request_fd: int, cred_fd: int) -> tcp.CredentialSource:
    """A one-shot source that asks the agent for the credential only when called."""
    used = False

    async def source() -> bytearray | None:
        nonlocal used
        if used:
            return None
        used = True
        await trio.to_thread.run_sync(os.write, request_fd, b"?")
        os.close(request_fd)
        secret = await trio.to_thread.run_sync(read_credential_fd, cred_fd)
        os.close(cred_fd)
        return secret if secret else None

    return source


def load_job(job_dir: Path) -> dict[str, Any]:
    """The job description the agent wrote to scratch; raise ScanFailed if malformed."""
    try:
        job = json.loads((job_dir / JOB_FILE).read_bytes())
        if not isinstance(job, dict):
            raise ValueError("not an object")
        targets = job[api.F_TARGETS]
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ValueError("targets must be a list of strings")
        api.parse_port_spec(str(job[api.F_PORTS]))
        if job.get(api.F_ENGINE, api.ENGINE_BUILTIN) not in api.ENGINES:
            raise ValueError(f"unknown engine {job.get(api.F_ENGINE)!r}")
    except (OSError, ValueError, KeyError) as e:
        raise ScanFailed(f"job file in {job_dir} is unusable ({e})") from None
    return job


async def run_job(
    job_dir: Path,
    opts: ScanOptions,
    time_offset: float,
    credential: tcp.CredentialSource | None,
) -> bytes:
    """Scan the job in *job_dir*; write and return the result document."""
    job = load_job(job_dir)
    engine = job.get(api.F_ENGINE, api.ENGINE_BUILTIN)
    targets: list[str] = job[api.F_TARGETS]
    ports_spec = str(job[api.F_PORTS])
    started = time.time() + time_offset
    log.info(
        "event=scan_start job=%s engine=%s targets=%d ports=%s",
        job[api.F_ID], engine, len(targets), ports_spec,
    )
    hosts: list[HostResult]
    if engine == api.ENGINE_NMAP:
        try:
            hosts = await nmap.run_nmap(targets, ports_spec, job_dir, opts.nmap_timeout)
        except nmap.NmapError as e:
            raise ScanFailed(str(e)) from None
    else:
        try:
            addresses, errors = await resolve(targets, opts.resolve_timeout)
        except TargetError as e:
            raise ScanFailed(str(e)) from None
        ports = api.expand_ports(ports_spec)
        hosts = await tcp.scan(addresses, ports, opts, credential, time_offset)
        hosts.extend(HostResult(t, "", error=msg) for t, msg in errors.items())
    finished = time.time() + time_offset
    body = result_document(str(job[api.F_ID]), engine, started, finished, hosts)
    tmp = job_dir / (RESULT_FILE + ".tmp")
    tmp.write_bytes(body)
    os.replace(tmp, job_dir / RESULT_FILE)
    log.info(
        "event=scan_done job=%s hosts=%d open=%d",
        job[api.F_ID], len(hosts), sum(h.count("open") for h in hosts),
    )
    return body


def main(argv: list[str] | None = None) -> int:
    """Entry point of the scan child (``python -m agent.scan``)."""
    p = argparse.ArgumentParser(prog="agent.scan", description="scan one job (agent child)")
    p.add_argument("job_dir", type=Path)
    p.add_argument("--time-offset", type=float, default=0.0)
    p.add_argument("--cred-request-fd", type=int)
    p.add_argument("--cred-fd", type=int)
    p.add_argument("--concurrency", type=int, default=ScanOptions.concurrency)
    p.add_argument("--connect-timeout", type=float, default=ScanOptions.connect_timeout)
    p.add_argument("--banner-timeout", type=float, default=ScanOptions.banner_timeout)
    args = p.parse_args(argv)
    # No time: the agent re-logs each line (agent/jobs.py) and stamps it then.
    logformat.setup(logging.INFO, timestamps=False)
    try:
        opts = ScanOptions(
            concurrency=args.concurrency,
            connect_timeout=args.connect_timeout,
            banner_timeout=args.banner_timeout,
        )
    except ValueError as e:
        print(f"agent.scan: {e}; fix the option", file=sys.stderr)
        return SCAN_USAGE
    source = None
    if args.cred_request_fd is not None and args.cred_fd is not None:
        source = make_credential_source(args.cred_request_fd, args.cred_fd)
    try:
        trio.run(run_job, args.job_dir, opts, args.time_offset, source)
    except ScanFailed as e:
        print(f"agent.scan: {e}; the job is reported as failed", file=sys.stderr)
        return SCAN_FAILED
    return SCAN_OK
