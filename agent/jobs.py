"""One job, end to end: inputs to scratch, scan child, upload with retry, shred on ack.

Scratch layout of a job (all on scratchfs, so every file is encrypted under a key that
lives only in the scratchfs process)::

    SCRATCH/jobs/JOB_ID/job.json            targets, ports, engine (no secrets)
    SCRATCH/jobs/JOB_ID/credential.sealed   the sealed blob exactly as received (still sealed)
    SCRATCH/jobs/JOB_ID/nmap.xml            nmap engine output (when used)
    SCRATCH/jobs/JOB_ID/result.json         the result document

The result stays on scratch until the platform acknowledges its SHA-256; only then is the
job directory removed (on scratchfs, unlink destroys the file's key: crypto-shredding).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from agent.errors import Deactivated, Quarantined
from agent.exitcodes import SCAN_OK
from agent.scan.model import ScanOptions
from agent.scan.runner import JOB_FILE, RESULT_FILE
from protocol import api
from protocol import credential as credmod
from protocol.client import (
    DeactivatedError,
    Job,
    PlatformClient,
    PlatformError,
    PlatformTLSError,
    PlatformUnavailableError,
    QuarantinedError,
)
from protocol.sealing import SealError, check_format
from scratchfs.keyholder.wipe import wipe

log = logging.getLogger("agent.jobs")
scan_log = logging.getLogger("agent.scan")

CREDENTIAL_FILE = "credential.sealed"
MAX_PIPE_CREDENTIAL = 60 * 1024  # below the 64 KiB pipe buffer: one write, never blocks


@dataclass
class JobSettings:
    """How jobs are run and uploaded (tunables, nothing security relevant)."""

    scan: ScanOptions
    upload_backoff_initial: float = 1.0
    upload_backoff_max: float = 30.0
    scan_grace: float = 5.0  # extra seconds over the scan's own bounds before killing it


class JobRunner:
    """Runs jobs inside a live scratch mount."""

    def __init__(
        self,
        client: PlatformClient,
        scratch: Path,
        open_sealed: Callable[[bytes, bytes], bytearray],
        time_offset: Callable[[], float],
        settings: JobSettings,
    ) -> None:
        self.client = client
        self.scratch = scratch
        self.open_sealed = open_sealed
        self.time_offset = time_offset
        self.settings = settings
        self.credential_opens = 0
        self.last_failure: str | None = None  # why the last handle() failed (for heartbeats)

    def job_dir(self, job_id: str) -> Path:
        """Where a job's files live on scratch."""
        if not api.JOB_ID_RE.match(job_id):
            raise ValueError("job id is not a platform job id")
        return self.scratch / "jobs" / job_id

    async def progress(self, job: Job, text: str) -> None:
        """Best-effort progress report; only deactivation and quarantine are fatal."""
        try:
            await self.client.progress(job.id, text)
        except (DeactivatedError, QuarantinedError):
            raise
        except PlatformError as e:
            log.warning("event=progress_failed job=%s reason=%s", job.id, e.reason)

    def write_inputs(self, job: Job) -> Path:
        """Write the job description (and the still-sealed credential) to scratch."""
        jdir = self.job_dir(job.id)
        if jdir.exists():  # a previous attempt in this run left it: start over
            shutil.rmtree(jdir)
        jdir.mkdir(mode=0o700, parents=True)
        doc = {
            api.F_ID: job.id,
            api.F_TARGETS: list(job.targets),
            api.F_PORTS: job.ports,
            api.F_ENGINE: job.engine,
            "attempt": job.attempt,
            "credential": CREDENTIAL_FILE if job.credential is not None else None,
        }
        (jdir / JOB_FILE).write_text(json.dumps(doc, sort_keys=True))
        if job.credential is not None:
            (jdir / CREDENTIAL_FILE).write_bytes(job.credential)
        return jdir

    async def _serve_credential(self, jdir: Path, request_fd: int, cred_fd: int) -> None:
        """Open the sealed credential only if the scan child asks for it, then wipe it."""
        try:
            await trio.lowlevel.wait_readable(request_fd)
            if os.read(request_fd, 1) != b"?":
                return  # the child finished without needing it: never decrypted
            sealed = (jdir / CREDENTIAL_FILE).read_bytes()
            try:
                if check_format(sealed) == 1:
                    # v1 blobs carry no scope: nowhere is "in scope", so the secret is not
                    # even opened. The child reports credential_unusable for every port.
                    log.error(
                        "event=credential_unusable error=%s",
                        "sealed in format v1 without a scope; re-seal it with scanner-seal",
                    )
                    return
                plaintext = self.open_sealed(sealed, api.SEAL_CONTEXT_CREDENTIAL)
            except SealError as e:
                log.error("event=credential_unusable error=%s", e)
                return
            try:
                self.credential_opens += 1
                _, check = credmod.unpack(plaintext)  # refuse malformed plaintext here already
                wipe(check)
                if len(plaintext) <= MAX_PIPE_CREDENTIAL:
                    os.write(cred_fd, plaintext)
                else:
                    log.error("event=credential_too_large limit=%d", MAX_PIPE_CREDENTIAL)
            except credmod.CredentialError as e:
                log.error("event=credential_unusable error=%s", e)
            finally:
                wipe(plaintext)
            log.info("event=credential_opened_for_check")
        finally:
            os.close(cred_fd)
            os.close(request_fd)

    async def _relay_stderr(self, stream: trio.abc.ReceiveStream) -> None:
        """Re-log the scan child's lines so that scan logs reach the syslog forwarder."""
        pending = b""
        async for chunk in stream:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").strip()
                level_name, _, rest = line.partition(" ")
                level = logging.getLevelName(level_name)
                _, _, message = rest.partition(" ")
                if isinstance(level, int) and message:
                    scan_log.log(level, "%s", message)
                elif line:
                    scan_log.warning("event=scan_child_output line=%r", line[:300])

    async def run_scan(self, job: Job, jdir: Path) -> bytes:
        """Run the scan child on *jdir*; return the result document (or an error document)."""
        opts = self.settings.scan
        argv = [
            sys.executable, "-m", "agent.scan", str(jdir),
            "--time-offset", repr(self.time_offset()),
            "--concurrency", str(opts.concurrency),
            "--connect-timeout", repr(opts.connect_timeout),
            "--banner-timeout", repr(opts.banner_timeout),
        ]  # fmt: skip
        pass_fds: tuple[int, ...] = ()
        parent_fds: tuple[int, int] | None = None
        if job.credential is not None:
            req_r, req_w = os.pipe2(os.O_CLOEXEC)
            cred_r, cred_w = os.pipe2(os.O_CLOEXEC)
            argv += ["--cred-request-fd", str(req_w), "--cred-fd", str(cred_r)]
            pass_fds = (req_w, cred_r)
            parent_fds = (req_r, cred_w)
        try:
            proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, pass_fds=pass_fds,
            )
        finally:
            for fd in pass_fds:
                os.close(fd)
        try:
            async with trio.open_nursery() as nursery:
                if parent_fds is not None:
                    nursery.start_soon(self._serve_credential, jdir, *parent_fds)
                    parent_fds = None
                assert proc.stderr is not None
                nursery.start_soon(self._relay_stderr, proc.stderr)
                await proc.wait()
        finally:
            if parent_fds is not None:
                for fd in parent_fds:
                    os.close(fd)
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
        result = jdir / RESULT_FILE
        if proc.returncode == SCAN_OK and result.exists():
            return result.read_bytes()
        log.error("event=scan_failed job=%s rc=%s", job.id, proc.returncode)
        self.last_failure = f"scan_failed job={job.id} rc={proc.returncode}"
        body = json.dumps(
            {
                "job": job.id,
                "engine": job.engine,
                "error": f"scan child exited with status {proc.returncode}",
                api.R_HOSTS: [],
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        result.write_bytes(body)
        return body

    async def upload(self, job: Job, body: bytes) -> str | None:
        """Upload until acknowledged; return the digest, or None if the platform refused.

        Connection failures and 5xx answers are retried with capped exponential backoff
        for as long as the agent runs; the result stays on scratch meanwhile.
        """
        delay = self.settings.upload_backoff_initial
        attempt = 0
        while True:
            attempt += 1
            try:
                digest = await self.client.upload_result(job.id, body)
            except (DeactivatedError, QuarantinedError):
                raise
            except (PlatformUnavailableError, PlatformTLSError) as e:
                retry = True
                reason = e.reason
            except PlatformError as e:
                if e.reason == api.REASON_ALREADY_COMPLETED:
                    log.warning("event=upload_superseded job=%s", job.id)
                    self.last_failure = f"upload_superseded job={job.id}"
                    return None
                retry = e.status is None or e.status >= 500 or e.status == 408
                reason = e.reason
                if not retry:
                    log.error("event=upload_refused job=%s status=%s reason=%s",
                              job.id, e.status, e.reason)
                    self.last_failure = f"upload_refused job={job.id} reason={e.reason}"
                    return None
            else:
                log.info("event=upload_acknowledged job=%s sha256=%s attempts=%d",
                         job.id, digest, attempt)
                return digest
            log.warning("event=upload_retry job=%s reason=%s attempt=%d retry_in=%.1f",
                        job.id, reason, attempt, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, self.settings.upload_backoff_max)

    def shred(self, job_id: str) -> None:
        """Remove the job's scratch files (scratchfs destroys each file's key on unlink)."""
        jdir = self.job_dir(job_id)
        if jdir.exists():
            shutil.rmtree(jdir)
        log.info("event=job_shredded job=%s", job_id)

    async def handle(self, job: Job) -> bool:
        """Inputs -> scan -> upload -> shred after acknowledgement, with progress reports.

        True when the scan succeeded and the platform acknowledged its result; otherwise
        False with the reason in ``last_failure``.
        """
        self.last_failure = None
        scan_log.info(
            "event=job_received job=%s attempt=%d engine=%s targets=%d",
            job.id, job.attempt, job.engine, len(job.targets),
        )
        try:
            jdir = self.write_inputs(job)
            await self.progress(job, "scanning")
            body = await self.run_scan(job, jdir)
            digest = hashlib.sha256(body).hexdigest()
            await self.progress(job, f"uploading {len(body)} bytes sha256={digest[:16]}")
            # upload() returns only once the platform acknowledged the digest or refused
            # the result for good (superseded, 4xx): either way nothing will take it later.
            await self.upload(job, body)
            self.shred(job.id)
            return self.last_failure is None
        except DeactivatedError:
            raise Deactivated("the platform deactivated this appliance") from None
        except QuarantinedError:
            # The result stays on scratch until shutdown shreds it: a quarantined appliance
            # may be the clone, and its results must not be taken.
            raise Quarantined("the platform quarantined this appliance (suspected clone)") from None
