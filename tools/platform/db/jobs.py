"""Jobs and their results: queueing, leasing (exactly once across nodes), completion."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final

from tools.platform import policy
from tools.platform.db.appliances import active_appliance_id
from tools.platform.db.connection import Database
from tools.platform.db.errors import NotFound
from tools.platform.db.events import add_event

JOB_SELECT: Final = """
    SELECT j.id, a.name, j.appliance_id, j.targets, j.ports, j.engine, j.state, j.created_at,
           j.lease_expires, j.attempts, j.progress, j.completed_at, c.name, c.sealed, r.sha256
    FROM jobs j JOIN appliances a ON a.id = j.appliance_id
    LEFT JOIN credentials c ON c.id = j.credential_id
    LEFT JOIN results r ON r.job_id = j.id
"""


@dataclass(frozen=True)
class JobRow:
    """One job, with its credential (sealed) when it has one."""

    id: int
    appliance: str
    appliance_id: int
    targets: list[str]
    ports: str
    engine: str
    state: str
    created_at: float
    lease_expires: float | None
    attempts: int
    progress: str | None
    completed_at: float | None
    credential_name: str | None
    credential_sealed: bytes | None = field(repr=False)
    result_sha256: str | None


@dataclass(frozen=True)
class Result:
    """A stored result document."""

    job_id: int
    sha256: str
    size: int
    body: bytes = field(repr=False)
    received_at: float


class Completion(Enum):
    """What complete_job() did."""

    STORED = "stored"  # first result for the job: stored, job done
    DUPLICATE = "duplicate"  # same digest as the stored result: nothing changed
    CONFLICT = "conflict"  # job already done with a different digest: refused


def _job_from_row(row: tuple[Any, ...]) -> JobRow:
    return JobRow(
        id=row[0],
        appliance=row[1],
        appliance_id=row[2],
        targets=json.loads(row[3]),
        ports=row[4],
        engine=row[5],
        state=row[6],
        created_at=row[7],
        lease_expires=row[8],
        attempts=row[9],
        progress=row[10],
        completed_at=row[11],
        credential_name=row[12],
        credential_sealed=None if row[13] is None else bytes(row[13]),
        result_sha256=row[14],
    )


class Jobs(Database):
    """Jobs of every appliance and their stored results."""

    def add_job(
        self,
        appliance: str,
        targets: list[str],
        ports: str,
        engine: str,
        credential: str | None,
        now: float,
    ) -> int:
        """Queue a job for an active appliance; returns the job id.

        With a credential, its scope is checked (policy.check_job_scope, OutOfScope) on the
        very row the job will reference, inside this transaction.
        """
        with self._tx() as db:
            appliance_id = active_appliance_id(db, appliance)
            cred_id = None
            if credential is not None:
                crow = db.execute(
                    "SELECT id, sealed FROM credentials WHERE appliance_id = ? AND name = ?",
                    (appliance_id, credential),
                ).fetchone()
                if crow is None:
                    raise NotFound(f"appliance {appliance!r} has no credential {credential!r}")
                cred_id = crow[0]
                policy.check_job_scope(credential, bytes(crow[1]), targets)
            job_id = int(
                db.execute(
                    "INSERT INTO jobs (appliance_id, targets, ports, engine, credential_id, state, "
                    "created_at) VALUES (?, ?, ?, ?, ?, 'queued', ?) RETURNING id",
                    (appliance_id, json.dumps(targets), ports, engine, cred_id, now),
                ).fetchone()[0]
            )
            add_event(db, now, appliance_id, "job_added", job_id=job_id)
            self._notify_job(db, appliance_id)
        return job_id

    def jobs(self, appliance: str | None = None) -> list[JobRow]:
        """Jobs, oldest first (optionally of one appliance)."""
        with self._read() as db:
            if appliance is None:
                rows = db.execute(JOB_SELECT + " ORDER BY j.id").fetchall()
            else:
                rows = db.execute(JOB_SELECT + " WHERE a.name = ? ORDER BY j.id", (appliance,)).fetchall()
        return [_job_from_row(r) for r in rows]

    def job(self, job_id: int) -> JobRow:
        """One job; raise NotFound."""
        with self._read() as db:
            row = db.execute(JOB_SELECT + " WHERE j.id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id}; see 'scanner-platform job list'")
        return _job_from_row(row)

    def lease_next(self, appliance_id: int, now: float, lease_seconds: float) -> JobRow | None:
        """Lease the oldest queued (or lease-expired) job of an appliance, or None.

        Exactly once across nodes: the row is taken with FOR UPDATE SKIP LOCKED, so two
        nodes leasing at once get different jobs (or none), never the same one.
        """
        with self._tx() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE appliance_id = ? AND (state = 'queued' OR "
                "(state = 'leased' AND lease_expires <= ?)) ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
                (appliance_id, now),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'leased', lease_expires = ?, attempts = attempts + 1 WHERE id = ?",
                (now + lease_seconds, row[0]),
            )
            add_event(db, now, appliance_id, "leased", job_id=row[0])
            return _job_from_row(db.execute(JOB_SELECT + " WHERE j.id = ?", (row[0],)).fetchone())

    def job_owner(self, job_id: int) -> tuple[int, str] | None:
        """(appliance id, state) of a job, or None."""
        with self._read() as db:
            row = db.execute("SELECT appliance_id, state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def complete_job(self, job_id: int, appliance_id: int, sha256: str, body: bytes, now: float) -> Completion:
        """Store a verified result exactly once; raise NotFound if not this appliance's job.

        The job row is locked (FOR UPDATE) first, so two nodes completing the same job at
        once serialise: the second sees 'done' and compares digests.
        """
        with self._tx() as db:
            row = db.execute(
                "SELECT state FROM jobs WHERE id = ? AND appliance_id = ? FOR UPDATE", (job_id, appliance_id)
            ).fetchone()
            if row is None or row[0] == "cancelled":
                raise NotFound(f"no job {job_id} for this appliance")
            if row[0] == "done":
                stored = db.execute("SELECT sha256 FROM results WHERE job_id = ?", (job_id,)).fetchone()
                return Completion.DUPLICATE if stored and stored[0] == sha256 else Completion.CONFLICT
            db.execute(
                "INSERT INTO results (job_id, sha256, size, body, received_at) VALUES (?,?,?,?,?)",
                (job_id, sha256, len(body), body, now),
            )
            db.execute(
                "UPDATE jobs SET state = 'done', completed_at = ?, lease_expires = NULL WHERE id = ?",
                (now, job_id),
            )
            add_event(db, now, appliance_id, "completed", f"sha256={sha256}", job_id)
        return Completion.STORED

    def set_progress(self, job_id: int, appliance_id: int, text: str, now: float) -> None:
        """Record the latest progress line of a job; raise NotFound if not the caller's."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET progress = ? WHERE id = ? AND appliance_id = ? AND state != 'cancelled'",
                (text, job_id, appliance_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no job {job_id} for this appliance")
            add_event(db, now, appliance_id, "progress", job_id=job_id)

    def result(self, job_id: int) -> Result:
        """The stored result of a job; raise NotFound."""
        with self._read() as db:
            row = db.execute(
                "SELECT job_id, sha256, size, body, received_at FROM results WHERE job_id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            raise NotFound(f"job {job_id} has no result yet; see 'scanner-platform job list'")
        return Result(job_id=row[0], sha256=row[1], size=row[2], body=bytes(row[3]), received_at=row[4])

    def result_count(self, job_id: int) -> int:
        """How many results are stored for a job (0 or 1 by construction)."""
        with self._read() as db:
            return int(db.execute("SELECT COUNT(*) FROM results WHERE job_id = ?", (job_id,)).fetchone()[0])

    def leasable_appliances(self, now: float) -> set[int]:
        """Appliances with a queued (or lease-expired) job."""
        with self._read() as db:
            rows = db.execute(
                "SELECT DISTINCT appliance_id FROM jobs WHERE state = 'queued' OR "
                "(state = 'leased' AND lease_expires <= ?)",
                (now,),
            ).fetchall()
        return {int(r[0]) for r in rows}
