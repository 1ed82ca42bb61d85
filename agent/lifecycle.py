"""The agent's life: boot -> time sync -> mTLS -> keyslot passphrase -> volume -> scratchfs -> jobs
-> shutdown (DESIGN.md §4). Deactivation erases the volume's keyslots and stops.

Run directory (``STATE_DIR/run``, 0700)::

    run/volume/          the opened volume's ext4 (mount point)
    run/volume-run/      the volume layer's own run dir (FUSE server state)
    run/scratch/         the scratchfs mount point
    run/scratchfs.pid    pid of the scratchfs child
    run/volume/backing/  scratchfs's backing store: opaque blobs, on the encrypted volume
    run/volume/logs/     scratchfs's log (it may name files; so it lives on the volume)
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import trio

from agent import timesync
from agent.attest_platform import attestor_for, boot_evidence
from agent.errors import (
    AgentError,
    AttestationRefused,
    Deactivated,
    PcrMismatchError,
    PlatformUnavailable,
    Quarantined,
    VolumeFailure,
)
from agent.heartbeat import Health, Heartbeat
from agent.jobs import JobRunner, JobSettings
from agent.scan.model import ScanOptions
from agent.scratch import ScratchMount, clear_stale
from agent.state import AgentState, ensure_run_dir
from agent.syslog import SyslogForwarder
from agent.tls import client_context
from agent.unlock import Unlocker
from protocol import api
from protocol.client import (
    REASON_PROXY,
    DeactivatedError,
    PlatformClient,
    PlatformConfig,
    PlatformError,
    PlatformTLSError,
    QuarantinedError,
)
from scratchfs.keyholder import mountinfo
from scratchfs.keyholder.wipe import wipe
from scratchfs.volume import api as volume_api
from scratchfs.volume.errors import NotOpenError, VolumeError

log = logging.getLogger("agent.lifecycle")

MiB = 1024 * 1024


@dataclass
class RunSettings:
    """Tunables of ``scanner-agent run`` (the platform URL and CA are NOT among them)."""

    once: bool = False
    poll_wait: float = 30.0
    volume_size: int = 256 * MiB
    backend: str = "auto"
    poll_backoff_max: float = 30.0
    jobs: JobSettings = field(default_factory=lambda: JobSettings(ScanOptions()))


def platform_error(e: PlatformError, step: str) -> AgentError:
    """Map a protocol-client failure to the agent error (and exit code) for *step*."""
    if isinstance(e, DeactivatedError):
        return Deactivated("the platform deactivated this appliance")
    if isinstance(e, QuarantinedError):
        return Quarantined(f"{step}: the platform quarantined this appliance (suspected clone)")
    if isinstance(e, PlatformTLSError):
        return PlatformUnavailable(f"{step}: {e}", "check the platform's certificate and CA")
    if e.reason == api.REASON_PCR_MISMATCH:
        return PcrMismatchError(
            f"{step}: the platform refuses this boot: the TPM's quote shows PCR values other than "
            "the appliance's recorded baseline (the measured boot state changed)",
            "if the change was intended, the operator accepts it with "
            "'scanner-platform appliance baseline NAME --accept'; otherwise investigate the boot chain",
        )
    if e.reason in ATTESTATION_REASONS:
        return AttestationRefused(f"{step}: the platform refused the TPM's evidence ({e.reason}): {e}")
    if e.reason == REASON_PROXY:
        return PlatformUnavailable(
            f"{step}: {e}",
            "check the proxy fixed at activation (reachable, credentials, CONNECT allowed)",
        )
    return PlatformUnavailable(f"{step}: {e}")


ATTESTATION_REASONS = frozenset({
    api.REASON_ATTESTATION_REQUIRED, api.REASON_ATTESTATION_INVALID, api.REASON_NONCE_INVALID,
    api.REASON_NOT_TPM_RESIDENT, api.REASON_ALREADY_ENROLLED,
})  # fmt: skip


def platform_client_for(state: AgentState, clock: timesync.Clock, *, mutual: bool) -> PlatformClient:
    """The one way an activated agent builds a platform client: the pinned CA, certificate
    times from the synced clock, our certificate and the keystore's TLS key when *mutual*
    (handed to OpenSSL through a memfd, never a file), and the proxy bound at activation
    (so no caller can forget it and connect directly).

    A mutual client needs the TLS key still in memory: build every one before
    ``state.forget_tls_key()``.
    """
    if mutual:
        ctx = client_context(state.ca_pem, clock, state.cert_pem, state.tls_key_pem())
    else:
        ctx = client_context(state.ca_pem, clock)
    return PlatformClient(state.endpoint.url, ctx, proxy=state.proxy)


def single_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one meaningful error of a nursery's exception group (agent errors first)."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)

    walk(group)
    for exc in leaves:
        if isinstance(exc, AgentError):
            return exc
    return leaves[0] if leaves else group


class Agent:
    """One run of the agent on a loaded, verified state dir."""

    def __init__(self, state: AgentState, settings: RunSettings) -> None:
        self.state = state
        self.settings = settings
        self.clock = timesync.Clock()
        self.run_dir = ensure_run_dir(state)
        self.volume_mnt = self.run_dir / "volume"
        self.volume_run = self.run_dir / "volume-run"
        self.scratch_mnt = self.run_dir / "scratch"
        self.scratch_pid = self.run_dir / "scratchfs.pid"
        self.volume: volume_api.OpenVolume | None = None
        self.scratch: ScratchMount | None = None
        self.forwarder: SyslogForwarder | None = None
        self.health = Health()
        self.heartbeat: Heartbeat | None = None
        self._forward_handler: logging.Handler | None = None

    def __repr__(self) -> str:
        return f"<Agent state={str(self.state.root)!r}>"

    # -- step 0: clear what a crash left behind --

    async def recover(self) -> None:
        """Clear a stale scratch mount and a volume left open by a killed run."""
        self.volume_mnt.mkdir(mode=0o700, exist_ok=True)
        if clear_stale(self.scratch_mnt, self.scratch_pid):
            log.warning("event=recovered_stale_scratch")
        if mountinfo.find(self.volume_mnt) is not None or self.volume_run.exists():
            try:
                await trio.to_thread.run_sync(
                    lambda: volume_api.close_volume(self.volume_mnt, run_dir=self.volume_run)
                )
                log.warning("event=recovered_stale_volume mountpoint=%s", self.volume_mnt)
            except NotOpenError:
                pass
            except VolumeError as e:
                raise VolumeFailure(f"cannot close the volume left open by a crash: {e}") from None

    # -- step 1: time --

    async def sync_time(self) -> None:
        """Measure the clock offset against the platform (server-authenticated TLS)."""
        anon = platform_client_for(self.state, self.clock, mutual=False)
        try:
            await timesync.sync(anon.time, self.clock)
        except PlatformError as e:
            raise platform_error(e, "time sync") from None

    # -- step 2: mutual TLS --

    def platform_client(self) -> PlatformClient:
        """The mTLS client: pinned CA, our certificate, certificate times from the clock."""
        return platform_client_for(self.state, self.clock, mutual=True)

    async def open_session(self, client: PlatformClient) -> None:
        """Advance the keystore's boot counter and register this boot with the platform.

        Every later request carries the session; a copy of this appliance that boots
        (or keeps running after this boot) is then visible to the platform as a counter
        that goes back or as an older session still in use.
        """
        kind = self.state.keystore.kind
        if kind == "file":
            log.warning(
                "event=keystore_insecure keystore=file detail=private_keys_in_clear_on_disk "
                "action=run_scanner-agent_migrate-keystore"
            )
        attestor = attestor_for(self.state)
        try:
            if attestor is None:
                counter = await trio.to_thread.run_sync(self.state.keystore.next_boot)
                evidence = None
            else:
                # The platform takes the counter from the TPM's certification of it.
                counter, evidence = await boot_evidence(client, attestor)
            token = await client.open_session(counter, kind, evidence)
        except PlatformError as e:
            raise platform_error(e, "opening the boot session") from None
        # Heartbeats name the session by its public id: the token itself is a credential.
        self.health.boot_session = api.session_id(token)
        self.health.boot_counter = counter
        log.info(
            "event=session_opened boot_counter=%d keystore=%s attested=%s",
            counter, kind, "yes" if attestor is not None else "no",
        )  # fmt: skip

    async def fetch_config(self, client: PlatformClient) -> PlatformConfig:
        """Syslog target and heartbeat interval."""
        try:
            return await client.config()
        except PlatformError as e:
            raise platform_error(e, "fetching the configuration") from None

    async def start_heartbeat(
        self, client: PlatformClient, config: PlatformConfig, nursery: trio.Nursery
    ) -> None:
        """Report health from now on, for as long as the agent runs (mounted or not)."""

        def mounts() -> tuple[Path | None, Path | None]:
            scratch = self.scratch.mountpoint if self.scratch is not None else None
            volume = self.volume_mnt if self.volume is not None else None
            return scratch, volume

        interval = config.heartbeat_interval or api.DEFAULT_HEARTBEAT_INTERVAL
        self.heartbeat = Heartbeat(client, self.health, self.clock, mounts, interval)
        await nursery.start(self.heartbeat.run)

    async def start_syslog(self, config: PlatformConfig, nursery: trio.Nursery) -> None:
        """Start forwarding scan logs to the syslog target the platform named."""
        if config.syslog is None:
            log.info("event=syslog_disabled")
            return
        target = config.syslog
        self.forwarder = SyslogForwarder(
            target.host, target.port, target.ca_pem, self.clock, self.state.appliance,
            proxy=self.state.proxy,
        )
        await nursery.start(self.forwarder.run)
        self._forward_handler = self.forwarder.handler()
        for name in ("agent.scan", "agent.jobs"):
            logging.getLogger(name).addHandler(self._forward_handler)
        log.info("event=syslog_forwarding target=%s:%d", target.host, target.port)

    # -- step 3: keyslot passphrase, volume, scratchfs --

    async def open_volume(self, client: PlatformClient) -> None:
        """Work out this boot's keyslot passphrase from the platform's share and the
        appliance's own (agent.unlock: migration and rotation included), format the volume
        on first boot, and open it."""
        image = self.state.volume_image

        async def format_volume(passphrase: bytearray) -> None:
            log.info("event=first_boot_format size=%d", self.settings.volume_size)
            await trio.to_thread.run_sync(
                lambda: volume_api.format_volume(
                    image, self.settings.volume_size, passphrase,
                    backend=self.settings.backend, run_dir=self.volume_run,
                )
            )

        unlocker = Unlocker(client, self.state.keystore, self.state.open_sealed, self.state.appliance,
                            image, format_volume)
        try:
            passphrase = await unlocker.passphrase()
        except PlatformError as e:
            raise platform_error(e, "fetching the volume key") from None
        except VolumeError as e:
            raise VolumeFailure(f"volume {image}: {e}") from None
        try:
            self.volume = await trio.to_thread.run_sync(
                lambda: volume_api.open_volume(
                    image, self.volume_mnt, passphrase, self.settings.backend, run_dir=self.volume_run
                )
            )
        except VolumeError as e:
            raise VolumeFailure(f"volume {image}: {e}") from None
        finally:
            wipe(passphrase)  # unlocked: not needed again in this run
        log.info("event=volume_open mountpoint=%s", self.volume_mnt)

    async def mount_scratch(self) -> ScratchMount:
        """Start scratchfs on a backing directory inside the volume."""
        logs = self.volume_mnt / "logs"
        logs.mkdir(mode=0o700, exist_ok=True)
        self.scratch = ScratchMount(
            self.volume_mnt / "backing", self.scratch_mnt, self.scratch_pid,
            logs / "scratchfs.log",
        )
        await self.scratch.start()
        return self.scratch

    # -- step 4: jobs --

    async def job_loop(self, client: PlatformClient, scratch: Path) -> None:
        """Long-poll and run jobs; with --once, return after the first one."""
        runner = JobRunner(
            client, scratch, self.state.open_sealed, lambda: self.clock.offset,
            self.settings.jobs,
        )
        delay = 1.0
        while True:
            try:
                job = await client.next_job(self.settings.poll_wait)
            except DeactivatedError:
                raise Deactivated("the platform deactivated this appliance") from None
            except QuarantinedError:
                raise Quarantined("polling for jobs: the platform quarantined this appliance") from None
            except PlatformError as e:
                log.warning("event=poll_failed reason=%s retry_in=%.1f", e.reason, delay)
                self.health.error(f"poll_failed reason={e.reason}")
                await trio.sleep(delay)
                delay = min(delay * 2, self.settings.poll_backoff_max)
                continue
            delay = 1.0
            if job is None:
                continue
            if await runner.handle(job):
                self.health.jobs_done += 1
            else:
                self.health.jobs_failed += 1
                self.health.error(runner.last_failure or "job_failed")
            if self.heartbeat is not None:
                # Off the grid: the platform sees the new counters now, not an interval
                # later (and with --once, before the agent exits).
                await self.heartbeat.beat()
            if self.settings.once:
                return

    # -- step 5: shutdown --

    async def shutdown(self) -> None:
        """Unmount scratchfs, close the volume, forget keys. Safe to call at any stage."""
        with trio.CancelScope(shield=True):
            if self.scratch is not None:
                await self.scratch.stop()
                self.scratch = None
            if self.volume is not None:
                vol = self.volume
                self.volume = None
                try:
                    await trio.to_thread.run_sync(vol.close)
                except VolumeError as e:
                    log.error("event=volume_close_failed error=%s", e)
            if self.forwarder is not None:
                await self.forwarder.flush(2.0)
                if self.forwarder.dropped:
                    log.warning("event=syslog_dropped_total count=%d", self.forwarder.dropped)
            if self._forward_handler is not None:
                for name in ("agent.scan", "agent.jobs"):
                    logging.getLogger(name).removeHandler(self._forward_handler)
            self.state.forget()
        log.info(
            "event=shutdown jobs_done=%d jobs_failed=%d",
            self.health.jobs_done, self.health.jobs_failed,
        )  # fmt: skip

    async def erase(self) -> None:
        """Deactivated: close everything and destroy every keyslot of the volume."""
        await self.shutdown()
        image = self.state.volume_image
        if image.exists():
            try:
                await trio.to_thread.run_sync(volume_api.erase_volume, image)
            except VolumeError as e:
                raise VolumeFailure(f"deactivated, but erasing {image} failed: {e}") from None
            log.warning("event=volume_erased image=%s", image)

    # -- all of it --

    async def _serve(self, nursery: trio.Nursery) -> None:
        await self.recover()
        await self.sync_time()
        # One client for the boot session: its kept-alive mTLS connection carries the
        # config, volume key, polls, progress and uploads.
        client = self.platform_client()
        self.state.forget_tls_key()  # OpenSSL holds the key now; our copy is not needed again
        try:
            await self.open_session(client)  # first: heartbeats and keys need the session
            config = await self.fetch_config(client)
            await self.start_heartbeat(client, config, nursery)
            await self.start_syslog(config, nursery)
            await self.open_volume(client)
            scratch = await self.mount_scratch()
            nursery.start_soon(scratch.watch)
            await self.job_loop(client, scratch.mountpoint)
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()

    async def run(self) -> int:
        """Run until --once is done, a signal arrives, or a fatal error; return 0 or raise."""
        try:
            try:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async with trio.open_nursery() as nursery:

                        async def on_signal() -> None:
                            async for signum in signals:
                                log.info("event=signal signal=%s", signal.Signals(signum).name)
                                nursery.cancel_scope.cancel()
                                return

                        nursery.start_soon(on_signal)
                        await self._serve(nursery)
                        nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                raise single_error(group) from None
        except Deactivated:
            log.warning("event=deactivated action=erase_keyslots")
            await self.erase()
            raise
        except BaseException:
            await self.shutdown()
            raise
        await self.shutdown()
        return 0
