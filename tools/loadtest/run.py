"""Load generator: a simulated fleet of appliances against one or several API nodes.

Every simulated appliance is real as far as the platform can tell: its own P-256 key and
CSR, its own X25519 sealing key, activation through the API, its own loopback source
address (127.0.x.y, as a fleet has one address per appliance), mutual TLS with its issued
certificate through `protocol.client.PlatformClient` (keep-alive included). The run:

1. ``init`` a state directory (SQLite, or PostgreSQL: a throwaway cluster, or --database),
   start ``--nodes`` ``scanner-platform serve`` processes on it (stopped by PID at the end);
2. add and activate every appliance (anonymous budget respected: 503 busy is retried) and
   open its boot session (shared by its workers);
3. boot storm: every appliance asks for its time and volume key at once, and unseals it;
4. for ``--duration`` seconds: jobs are queued (some up front, the rest trickled in to
   exercise the long-poll wake-ups), each appliance runs ``--pollers`` workers, each on a
   different node, that poll, report progress and upload a result with its digest; some
   uploads are repeated on another node (must be acknowledged, stored once);
5. drain, then check: every queued job completed exactly once (no job handed to two
   workers, one result row, one 'completed' event) and every result intact (stored digest
   = uploaded digest = SHA-256 of the stored body);
6. with ``--slowloris N``: N anonymous TLS connections from other addresses send
   ``POST /v1/activate`` with ``Content-Length: 65536`` and one byte every 20 s (reconnecting
   when the platform closes them) for the whole run, while a probe measures a fresh
   ``GET /v1/time`` and an appliance poll once a second.

Prints throughput, p50/p99 latency per endpoint, errors (5xx separately) and the checks
(measured and rendered by `tools.loadtest.report`);
``--json FILE`` writes the same numbers. Exit 0 only if every check held and no 5xx was seen.
Exit codes: 0 pass; 1 a check failed (lost/duplicated job, corrupt result, 5xx, boot-storm
miss); 2 usage error; 3 the platform or database could not be started.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import random
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from agent.timesync import Clock
from agent.tls import client_context
from protocol import api, client, sealing
from tools.children import stop_child
from tools.loadtest.report import Stats, render
from tools.platform import ca, db, state
from tools.platform.pgtemp import PostgresError, temp_postgres

HOSTNAME = "localhost"
ATTACK_SETTLE = 8.0  # seconds the attack runs before the fleet starts (kernel deferral is 5 s)
RSS_SETTLE = 25.0  # seconds after the attack before node 0's RSS is read again (two log intervals)
EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_START = 0, 1, 2, 3
PLATFORM = [sys.executable, "-m", "tools.platform"]


def tls(ca_pem: bytes, cert_pem: bytes | None = None, key_pem: bytes | None = None) -> ssl.SSLContext:
    """The agent's TLS client policy (agent.tls: keys reach OpenSSL through a memfd)."""
    return client_context(ca_pem, Clock(), cert_pem, key_pem)


def appliance_address(i: int) -> str:
    """A distinct loopback source address for appliance *i*, each in its own /24 (a fleet is
    spread over many sites): 127.10.0.1, 127.10.1.1, ... (up to 127.88.x.1 for 20,000)."""
    return f"127.{10 + i // 256}.{i % 256}.1"


# The probes' own network, apart from the fleet's and the attackers'.
PROBE_ADDRESS = "127.0.8.1"


def _rss_mb(pid: int) -> float:
    """Resident memory of process *pid* in MiB (0.0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return 0.0


@dataclass
class SimAppliance:
    index: int
    name: str
    key_pem: bytes = field(repr=False)
    csr_pem: bytes
    x_private: bytes = field(repr=False)
    x_public: bytes
    code: str = field(repr=False)
    clients: list[client.PlatformClient] = field(default_factory=list)


@dataclass
class Ledger:
    """What the fleet saw: who got which job, which digest was acknowledged."""

    handed: Counter[int] = field(default_factory=Counter)
    acked: dict[int, str] = field(default_factory=dict)
    queued: set[int] = field(default_factory=set)
    duplicate_uploads: int = 0


@contextlib.contextmanager
def platform_nodes(root: Path, nodes: int, extra: list[str]) -> Iterator[list[tuple[int, int]]]:
    """Start *nodes* serve processes on one state dir; their (port, pid). Stopped by PID."""
    procs: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    try:
        for n in range(nodes):
            log = open(root.parent / f"node{n}.log", "wb")  # closed below, the child keeps its copy
            proc = subprocess.Popen(
                [*PLATFORM, "--log-level", "WARNING", "serve", str(root), "--listen", "127.0.0.1:0", *extra],
                stdout=subprocess.PIPE,
                stderr=log,
            )
            log.close()
            procs.append(proc)
            assert proc.stdout is not None
            line = proc.stdout.readline().decode()
            if not line.startswith("listening on "):
                raise RuntimeError(f"node {n} did not start; see {root.parent / f'node{n}.log'}")
            ports.append(int(line.rsplit(":", 1)[1]))
        yield [(port, proc.pid) for port, proc in zip(ports, procs, strict=True)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
            if proc.stdout is not None:
                proc.stdout.close()


class Run:
    """One load run against running nodes."""

    def __init__(self, args: argparse.Namespace, paths: state.StatePaths, nodes: list[tuple[int, int]]) -> None:
        self.args = args
        self.paths = paths
        self.ports = [port for port, _pid in nodes]
        self.pids = [pid for _port, pid in nodes]
        self.probe_codes: list[str] = []  # spare appliances the probe activates, one per round
        self.ca_pem = paths.ca_cert.read_bytes()
        self.stats = Stats()
        self.ledger = Ledger()
        self.storage = state.open_storage(paths, pool_size=2)
        self.report: dict[str, Any] = {}
        self.rng = random.Random(args.seed)  # noqa: S311 - reproducible job placement, not crypto

    def url(self, node: int) -> str:
        return f"https://{HOSTNAME}:{self.ports[node % len(self.ports)]}"

    # -- phases --

    def make_fleet(self) -> list[SimAppliance]:
        fleet = []
        now = time.time()
        # One more than the fleet: the slowloris probe's appliance, which never gets jobs
        # (a probe poll on a fleet appliance would lease, and strand, that one's jobs).
        for i in range(self.args.appliances + 1):
            name = f"sim{i:05d}"
            code = ca.new_activation_code()
            self.storage.add_appliance(name, ca.code_hash(code), now + 3600, now)
            key_pem, csr = client.new_client_key_and_csr(name)
            xpriv, xpub = sealing.generate_keypair()
            fleet.append(SimAppliance(i, name, key_pem, csr, xpriv, xpub, code))
        if self.args.slowloris or self.args.attack:
            for i in range(int(self.args.duration) + 60):  # one per probe round (1 s) and some
                code = ca.new_activation_code()
                self.storage.add_appliance(f"probe{i:05d}", ca.code_hash(code), now + 3600, now)
                self.probe_codes.append(code)
        return fleet

    async def activate_all(self, fleet: list[SimAppliance]) -> None:
        limiter = trio.CapacityLimiter(8)

        async def one(a: SimAppliance) -> None:
            async with limiter:
                anon = client.PlatformClient(
                    self.url(a.index), tls(self.ca_pem), local_address=appliance_address(a.index)
                )
                for attempt in range(50):
                    try:
                        res = await self.stats.timed("activate", anon.activate, a.code, a.csr_pem, a.x_public)
                        break
                    except client.PlatformError as e:
                        if e.reason not in (api.REASON_BUSY, "unavailable") or attempt == 49:
                            raise
                        await trio.sleep(0.05 * (attempt + 1))
                ctx = tls(self.ca_pem, res.certificate_pem, a.key_pem)
                a.clients = [
                    client.PlatformClient(
                        self.url(a.index + w), ctx, timeout=60, local_address=appliance_address(a.index)
                    )
                    for w in range(self.args.pollers)
                ]
                # One boot session per appliance, shared by its workers on every node: a
                # second session would supersede the first, which the platform treats as a
                # clone (quarantine).
                token = await self.stats.timed("session", a.clients[0].open_session, 1, "file")
                for c in a.clients[1:]:
                    c.session = token

        async with trio.open_nursery() as nursery:
            for a in fleet:
                nursery.start_soon(one, a)

    async def boot_storm(self, fleet: list[SimAppliance]) -> None:
        ok = 0
        t0 = trio.current_time()

        async def one(a: SimAppliance) -> None:
            nonlocal ok
            c = a.clients[0]
            await self.stats.timed("time", c.time)
            sealed = await self.stats.timed("volume-key", c.keyslot_passphrase)
            key = sealing.open_sealed(a.x_private, sealed, api.SEAL_CONTEXT_VOLUME_KEY)
            if len(key) == 32:
                ok += 1

        with trio.move_on_after(60):
            async with trio.open_nursery() as nursery:
                for a in fleet:
                    nursery.start_soon(self._guard, one, a)
        self.report["boot_storm"] = {
            "appliances": len(fleet),
            "volume_keys_unsealed": ok,
            "seconds": round(trio.current_time() - t0, 2),
        }

    async def _guard(self, fn: Callable[[SimAppliance], Awaitable[None]], a: SimAppliance) -> None:
        try:
            await fn(a)
        except client.PlatformError:
            pass  # counted in stats.errors

    def queue_jobs(self, fleet: list[SimAppliance], count: int) -> None:
        for _ in range(count):
            a = self.rng.choice(fleet)
            jid = self.storage.add_job(a.name, ["127.0.0.1"], "22", api.ENGINE_BUILTIN, None, time.time())
            self.ledger.queued.add(jid)

    async def feeder(self, fleet: list[SimAppliance], total: int, seconds: float) -> None:
        """Queue *total* jobs spread over *seconds* (the long-polls must wake for them)."""
        batches = max(1, int(seconds * 4))
        for b in range(batches):
            n = total // batches + (1 if b < total % batches else 0)
            await trio.to_thread.run_sync(self.queue_jobs, fleet, n)
            await trio.sleep(seconds / batches)

    async def worker(self, a: SimAppliance, w: int, stop: trio.Event) -> None:
        c = a.clients[w]
        while not stop.is_set():
            try:
                job = await self.stats.timed("jobs/next (long-poll)", c.next_job, self.args.poll_wait)
            except client.PlatformError:
                await trio.sleep(0.5)
                continue
            if job is None:
                continue
            jid = int(job.id)
            self.ledger.handed[jid] += 1
            body = json.dumps(
                {"job": job.id, "engine": job.engine, "appliance": a.name,
                 "pad": base64.b64encode(os.urandom(self.args.result_bytes)).decode()}
            ).encode()
            try:
                await self.stats.timed("progress", c.progress, job.id, "50%")
                digest = await self.stats.timed("result", c.upload_result, job.id, body)
                self.ledger.acked[jid] = digest
                if self.rng.random() < 0.05:  # a retry after a lost ack, to another node
                    other = a.clients[(w + 1) % len(a.clients)]
                    again = await self.stats.timed("result (repeat)", other.upload_result, job.id, body)
                    self.ledger.duplicate_uploads += again == digest
            except client.PlatformError:
                continue

    async def slowloris(self, count: int, stop: trio.Event) -> None:
        ctx = tls(self.ca_pem)
        head = (
            f"POST {api.PATH_ACTIVATE} HTTP/1.1\r\nhost: {HOSTNAME}\r\ncontent-type: application/json\r\n"
            "content-length: 65536\r\n\r\n"
        ).encode()
        held = Counter[str]()

        async def attacker(i: int) -> None:
            # The pattern: TLS, the head of a 64 KiB activation, then one byte every
            # 20 s; a dropped connection is reopened at the next 20 s tick (as slowloris
            # tools do), not at once (that would be a handshake flood, another attack).
            source = f"127.0.2.{1 + i // 32}"
            await trio.sleep(i * 0.01)  # spread the openings over ~2.5 s
            while not stop.is_set():
                try:
                    sock = trio.socket.socket()
                    await sock.bind((source, 0))
                    await sock.connect(("127.0.0.1", self.ports[i % len(self.ports)]))
                    s = trio.SSLStream(trio.SocketStream(sock), ctx, server_hostname=HOSTNAME, https_compatible=True)
                    await s.do_handshake()
                    await s.send_all(head)
                    held["connected"] += 1
                    while True:
                        with trio.move_on_after(20):
                            if not await s.receive_some(4096):
                                break
                            held["answered (503/408)"] += 1
                            break  # the platform answered: it let go of this connection
                        await s.send_all(b" ")
                    await trio.aclose_forcefully(s)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    held["refused"] += 1
                await trio.sleep(20)

        self.report["slowloris"] = held  # filled in while the attack runs (it ends cancelled)
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(attacker, i)
            nursery.start_soon(self.probe, stop)

    async def probe(self, stop: trio.Event) -> None:
        """Once a second, what a legitimate party sees, each on a fresh connection (through
        the TLS handshake, where a flood waits): an appliance's poll, the time, an activation."""
        anon_ctx = tls(self.ca_pem)
        appliance = self._probe_client
        codes = iter(self.probe_codes)
        while not stop.is_set():
            if appliance is not None:
                await appliance.aclose()
                with contextlib.suppress(client.PlatformError):
                    await self.stats.timed("probe: poll (fresh TLS)", appliance.next_job, 0)
            anon = client.PlatformClient(self.url(0), anon_ctx, timeout=10, local_address=PROBE_ADDRESS)
            with contextlib.suppress(client.PlatformError):
                await self.stats.timed("probe: time (fresh TLS)", anon.time)
            code = next(codes, None)
            if code is not None:
                _key_pem, csr = client.new_client_key_and_csr("probe")
                _xpriv, xpub = sealing.generate_keypair()
                with contextlib.suppress(client.PlatformError):
                    await self.stats.timed("probe: activate (fresh)", anon.activate, code, csr, xpub)
            await trio.sleep(1.0)

    async def many_source_attack(self, stop: trio.Event) -> None:
        """Run `tools.loadtest.attack` against node 0 in its own process while the fleet
        works; probe meanwhile; sample node 0's RSS before, during and after."""
        a = self.args
        rss = {"before_mb": _rss_mb(self.pids[0]), "peak_mb": 0.0}
        cmd = [
            sys.executable, "-m", "tools.loadtest.attack", "--port", str(self.ports[0]),
            "--ca", str(self.paths.ca_cert), "--idle-sources", str(a.attack_sources),
            "--idle-per-source", str(a.attack_idle_per_source), "--slow-heads", str(a.attack_slow_heads),
            "--slow-bodies", str(a.attack_slow_bodies), "--seconds", str(a.duration + 120),
        ]  # fmt: skip
        cmd += ["--spread"] if a.attack_spread else []
        cmd += ["--stalled-hellos"] if a.attack_stalled_hellos else []
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        self.report["attack"] = {"rss": rss}
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.probe, stop)
                while not stop.is_set():
                    rss["peak_mb"] = max(rss["peak_mb"], _rss_mb(self.pids[0]))
                    with trio.move_on_after(1.0):
                        await stop.wait()
        finally:
            stop_child(proc)
            out = proc.stdout.read() if proc.stdout is not None else b""
            if proc.stdout is not None:
                proc.stdout.close()
            lines = out.decode(errors="replace").strip().splitlines()
            with contextlib.suppress(ValueError, IndexError):  # killed before it could report
                self.report["attack"]["attacker_saw"] = json.loads(lines[-1])
            rss["end_mb"] = _rss_mb(self.pids[0])

    _probe_client: client.PlatformClient | None = None

    async def main(self) -> None:
        args = self.args
        t_setup = time.monotonic()
        fleet = await trio.to_thread.run_sync(self.make_fleet)
        await self.activate_all(fleet)
        self._probe_client = fleet.pop().clients[0]
        self.report["setup_seconds"] = round(time.monotonic() - t_setup, 1)
        await self.boot_storm(fleet)
        upfront = args.jobs // 2
        await trio.to_thread.run_sync(self.queue_jobs, fleet, upfront)
        stop = trio.Event()
        attack_stop = trio.Event()
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            if args.slowloris:
                nursery.start_soon(self.slowloris, args.slowloris, attack_stop)
                await trio.sleep(2.0)  # let the attack settle before the fleet is measured
            if args.attack:
                nursery.start_soon(self.many_source_attack, attack_stop)
                await trio.sleep(ATTACK_SETTLE)  # past the kernel's deferral of silent connections
            for a in fleet:
                for w in range(args.pollers):
                    nursery.start_soon(self.worker, a, w, stop)
            await self.feeder(fleet, args.jobs - upfront, args.duration)
            # Drain: every queued job done, or give up after a bounded time.
            with trio.move_on_after(max(30.0, args.duration)):
                while len(self.ledger.acked) < len(self.ledger.queued):
                    await trio.sleep(0.2)
            stop.set()
            attack_stop.set()
            nursery.cancel_scope.cancel()  # workers parked in a long-poll, attackers mid-trickle
        elapsed = trio.current_time() - t0
        self.report["run_seconds"] = round(elapsed, 1)
        if args.attack:
            # Memory after the flood: the platform sums up and gives back once per interval.
            await trio.sleep(RSS_SETTLE)
            self.report["attack"]["rss"][f"after_{RSS_SETTLE:g}s_mb"] = _rss_mb(self.pids[0])
        for a in fleet:
            for c in a.clients:
                await c.aclose()
        self.check(elapsed)

    def check(self, elapsed: float) -> None:
        jobs = {j.id: j for j in self.storage.jobs()}
        completed = Counter(e[2] for e in self.storage.events("completed"))
        lost = [j for j in self.ledger.queued if jobs[j].state != "done"]
        handed_twice = [j for j, n in self.ledger.handed.items() if n > 1]
        bad_results = []
        for jid in self.ledger.queued:
            if jobs[jid].state != "done":
                continue
            res = self.storage.result(jid)
            if (
                self.storage.result_count(jid) != 1
                or completed[jid] != 1
                or hashlib.sha256(res.body).hexdigest() != res.sha256
                or self.ledger.acked.get(jid) != res.sha256
            ):
                bad_results.append(jid)
        requests = sum(len(v) for v in self.stats.latencies.values())
        self.report.update(
            {
                "appliances": self.args.appliances,
                "nodes": len(self.ports),
                "backend": self.storage.backend,
                "jobs_queued": len(self.ledger.queued),
                "jobs_completed": len(self.ledger.queued) - len(lost),
                "jobs_lost": len(lost),
                "lost_states": dict(Counter(f"{jobs[j].state}/attempts={jobs[j].attempts}" for j in lost)),
                "jobs_handed_out_twice": len(handed_twice),
                "results_bad": len(bad_results),
                "repeat_uploads_acked": self.ledger.duplicate_uploads,
                "requests": requests,
                "requests_per_s": round(requests / elapsed, 1) if elapsed > 0 else 0.0,
                "errors": dict(self.stats.errors),
                "server_errors_5xx": self.stats.server_errors,
                "endpoints": self.stats.summary(),
            }
        )
        storm = self.report.get("boot_storm", {})
        self.report["pass"] = (
            not lost
            and not handed_twice
            and not bad_results
            and self.stats.server_errors == 0
            and storm.get("volume_keys_unsealed") == self.args.appliances
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.loadtest", description="simulate a fleet against the platform")
    p.add_argument("--appliances", type=int, default=100, help="simulated appliances (default 100)")
    p.add_argument("--jobs", type=int, default=None, help="jobs queued in all (default 2 per appliance)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds over which jobs are queued (default 30)")
    p.add_argument("--nodes", type=int, default=1, help="API nodes (serve processes) on one database")
    p.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    p.add_argument("--database", metavar="URL", help="use this PostgreSQL database instead of a throwaway one")
    p.add_argument("--pollers", type=int, default=1, help="concurrent workers per appliance, each on another node")
    p.add_argument("--poll-wait", type=float, default=10.0, help="long-poll wait of each worker (s)")
    p.add_argument("--result-bytes", type=int, default=2048, help="random bytes in each result")
    p.add_argument("--slowloris", type=int, default=0, metavar="N", help="also run N slowloris connections")
    p.add_argument(
        "--attack", action="store_true", help="also run the many-source attack (tools.loadtest.attack) on node 0"
    )
    p.add_argument("--attack-sources", type=int, default=100, help="idle-handshake sources (127.0.0.2 up)")
    p.add_argument("--attack-idle-per-source", type=int, default=64, help="idle connections per source")
    p.add_argument("--attack-spread", action="store_true", help="each idle source in its own /24 (127.1.k.1)")
    p.add_argument("--attack-stalled-hellos", action="store_true", help="half the idle ones send a ClientHello")
    p.add_argument("--attack-slow-heads", type=int, default=64, help="slow request heads from one address")
    p.add_argument("--attack-slow-bodies", type=int, default=16, help="slow activation bodies from that address")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.appliances <= 20_000 or not 1 <= args.nodes <= 16 or not 1 <= args.pollers <= 8:
        print("loadtest: --appliances 1-20000, --nodes 1-16, --pollers 1-8; see --help", file=sys.stderr)
        return EXIT_USAGE
    if not 0 < args.duration <= 3600 or not 0 <= args.poll_wait <= api.MAX_WAIT_SECONDS:
        print("loadtest: --duration 0-3600 s, --poll-wait 0-60 s; see --help", file=sys.stderr)
        return EXIT_USAGE
    if args.nodes > 1 and args.backend == "sqlite" and args.database is None:
        print("loadtest: several nodes need --backend postgresql (SQLite is one process's)", file=sys.stderr)
        return EXIT_USAGE
    args.jobs = args.appliances * 2 if args.jobs is None else args.jobs
    with tempfile.TemporaryDirectory(prefix="scratchfs-load-") as tmp, contextlib.ExitStack() as stack:
        url = args.database
        if url is None and args.backend == "postgresql":
            try:
                url = stack.enter_context(temp_postgres()).create_database("load")
            except PostgresError as e:
                print(f"loadtest: cannot start PostgreSQL: {e}", file=sys.stderr)
                return EXIT_START
        paths = state.init_state(Path(tmp) / "platform", HOSTNAME, url)
        try:
            state.open_storage(paths, pool_size=1).close()
        except db.StorageError as e:
            print(f"loadtest: {e}", file=sys.stderr)
            return EXIT_START
        conns = args.appliances * args.pollers + args.slowloris + 256
        if args.attack:
            conns = max(conns, 4096)  # the deployed default: the attack meets the real pool
        # Pool per node: enough for a share of the fleet, within PostgreSQL's max_connections.
        pool = str(max(4, min(32, 200 // args.nodes)))
        extra = ["--max-connections", str(conns), "--lease-seconds", "600", "--db-pool", pool]
        try:
            nodes = stack.enter_context(platform_nodes(paths.root, args.nodes, extra))
        except RuntimeError as e:
            print(f"loadtest: {e}", file=sys.stderr)
            return EXIT_START
        run = Run(args, paths, nodes)
        with run.storage:
            trio.run(run.main)
        print(render(run.report))
        if args.json:
            Path(args.json).write_text(json.dumps(run.report, indent=2) + "\n")
        return EXIT_PASS if run.report["pass"] else EXIT_FAIL
