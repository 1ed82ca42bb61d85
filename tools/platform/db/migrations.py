"""The schema: one append-only list of portable migrations (both backends).

Add ``(N + 1, [statements])`` at the end, never edit one that shipped. Statements follow the
portable-SQL rules of the package docstring; `dialect.Dialect.ddl` translates the types.
Column names are stored data: a rename needs a migration (the wrapped keyslot passphrase's
column keeps its first name, ``wrapped_volume_key``).
"""

from __future__ import annotations

from typing import Final

MIGRATIONS: Final[list[tuple[int, list[str]]]] = [
    (
        1,
        [
            """CREATE TABLE appliances (
                id INTEGER PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                state TEXT NOT NULL CHECK (state IN ('pending', 'active', 'deactivated')),
                created_at REAL NOT NULL,
                code_hash BLOB UNIQUE,
                code_expires REAL,
                activated_at REAL,
                deactivated_at REAL,
                x25519_public BLOB,
                cert_serial TEXT,
                cert_fingerprint TEXT UNIQUE,
                wrapped_volume_key BLOB
            )""",
            """CREATE TABLE revoked (
                serial TEXT PRIMARY KEY,
                fingerprint TEXT NOT NULL,
                appliance_id INTEGER NOT NULL REFERENCES appliances(id),
                revoked_at REAL NOT NULL,
                reason TEXT NOT NULL
            )""",
            """CREATE TABLE credentials (
                id INTEGER PRIMARY KEY,
                appliance_id INTEGER NOT NULL REFERENCES appliances(id),
                name TEXT NOT NULL,
                sealed BLOB NOT NULL,
                created_at REAL NOT NULL,
                UNIQUE (appliance_id, name)
            )""",
            """CREATE TABLE jobs (
                id INTEGER PRIMARY KEY,
                appliance_id INTEGER NOT NULL REFERENCES appliances(id),
                targets TEXT NOT NULL,
                ports TEXT NOT NULL,
                engine TEXT NOT NULL,
                credential_id INTEGER REFERENCES credentials(id),
                state TEXT NOT NULL CHECK (state IN ('queued', 'leased', 'done', 'cancelled')),
                created_at REAL NOT NULL,
                lease_expires REAL,
                attempts INTEGER NOT NULL DEFAULT 0,
                progress TEXT,
                completed_at REAL
            )""",
            """CREATE TABLE results (
                job_id INTEGER PRIMARY KEY REFERENCES jobs(id),
                sha256 TEXT NOT NULL,
                size INTEGER NOT NULL,
                body BLOB NOT NULL,
                received_at REAL NOT NULL
            )""",
            """CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
            """CREATE TABLE events (
                id INTEGER PRIMARY KEY,
                at REAL NOT NULL,
                appliance_id INTEGER,
                job_id INTEGER,
                kind TEXT NOT NULL,
                detail TEXT NOT NULL DEFAULT ''
            )""",
        ],
    ),
    (
        2,
        [
            "CREATE INDEX jobs_by_appliance_state ON jobs (appliance_id, state, id)",
            "CREATE INDEX events_by_job ON events (job_id, kind)",
        ],
    ),
    (
        3,
        [
            # Sealing format v2: the appliance's hybrid (ML-KEM-768 + X25519) public key,
            # set at activation or later over mutual TLS (POST /v1/appliance/seal-key).
            # NULL = the appliance still has only its X25519 key (keyslot passphrase sealed v1).
            "ALTER TABLE appliances ADD COLUMN hybrid_public BLOB",
        ],
    ),
    (
        4,
        [
            # One row per boot of an appliance (clone detection). Only token hashes are kept.
            """CREATE TABLE sessions (
                id INTEGER PRIMARY KEY,
                appliance_id INTEGER NOT NULL REFERENCES appliances(id),
                token_hash BLOB NOT NULL UNIQUE,
                boot_counter INTEGER NOT NULL,
                keystore TEXT NOT NULL,
                created_at REAL NOT NULL,
                current INTEGER NOT NULL CHECK (current IN (0, 1))
            )""",
            "CREATE INDEX sessions_by_appliance ON sessions (appliance_id, id)",
            # A row means: quarantined (no volume key, no jobs) until an operator clears it.
            """CREATE TABLE quarantine (
                appliance_id INTEGER PRIMARY KEY REFERENCES appliances(id),
                since REAL NOT NULL,
                reason TEXT NOT NULL
            )""",
        ],
    ),
    (
        5,
        [
            # Heartbeats: the latest status per appliance, the health state last recorded
            # by the evaluator (its compare-and-set makes each transition happen once),
            # and a bounded history (HEARTBEAT_HISTORY rows per appliance).
            """CREATE TABLE appliance_health (
                appliance_id INTEGER PRIMARY KEY REFERENCES appliances(id),
                last_seen REAL,
                status TEXT,
                health TEXT NOT NULL DEFAULT 'ok',
                health_since REAL NOT NULL
            )""",
            """CREATE TABLE heartbeats (
                id INTEGER PRIMARY KEY,
                appliance_id INTEGER NOT NULL REFERENCES appliances(id),
                received_at REAL NOT NULL,
                status TEXT NOT NULL
            )""",
            "CREATE INDEX heartbeats_by_appliance ON heartbeats (appliance_id, id)",
            # No quarantine column: the health state "quarantined" is derived from the
            # quarantine table of migration 4 (Storage.quarantined_at and health()).
        ],
    ),
    (
        6,
        [
            # The long-poll waker asks "which appliances have a leasable job" once per
            # sweep; without this index that is a scan of every job ever queued.
            "CREATE INDEX jobs_by_state ON jobs (state, lease_expires, appliance_id)",
        ],
    ),
    (
        7,
        [
            # Split volume keys (agent/volumekey.py). key_scheme 'passphrase': the platform
            # holds the keyslot passphrase itself (wrapped_volume_key; every appliance
            # activated so far, until its agent migrates); 'split': it holds only its share
            # of key epoch share_epoch (wrapped_share, KEK-wrapped with the epoch bound).
            # A pending share (migration or rotation) waits in the pending_* columns until
            # the appliance commits it; the value it replaces is then shredded.
            "ALTER TABLE appliances ADD COLUMN key_scheme TEXT NOT NULL DEFAULT 'passphrase'",
            "ALTER TABLE appliances ADD COLUMN share_epoch INTEGER",
            "ALTER TABLE appliances ADD COLUMN wrapped_share BLOB",
            "ALTER TABLE appliances ADD COLUMN pending_epoch INTEGER",
            "ALTER TABLE appliances ADD COLUMN wrapped_pending_share BLOB",
        ],
    ),
    (
        8,
        [
            # Remote attestation (db/attestation.py): per appliance the enrolled TPM (EK
            # certificate, AK public area, names of the sealed KEK object and NV counter),
            # the PCR baseline and the last verified boot.
            """CREATE TABLE attestations (
                appliance_id INTEGER PRIMARY KEY REFERENCES appliances(id),
                state TEXT NOT NULL CHECK (state IN ('enrolling', 'attested')),
                ek_certificate BLOB NOT NULL,
                ek_fingerprint TEXT NOT NULL,
                ak_public BLOB NOT NULL,
                kek_name BLOB NOT NULL,
                counter_name BLOB NOT NULL,
                counter_base INTEGER NOT NULL,
                pcrs TEXT NOT NULL,
                challenge_hash BLOB,
                challenge_expires REAL,
                pcr_values TEXT,
                pcr_digest BLOB,
                pcr_state TEXT NOT NULL DEFAULT 'ok',
                pending_pcr_values TEXT,
                pending_at REAL,
                enrolled_at REAL,
                last_verified REAL
            )""",
            "CREATE INDEX attestations_by_ek ON attestations (ek_fingerprint)",
            # One outstanding session nonce per appliance (a new one replaces it): bounded.
            """CREATE TABLE session_nonces (
                appliance_id INTEGER PRIMARY KEY REFERENCES appliances(id),
                nonce_hash BLOB NOT NULL,
                expires REAL NOT NULL
            )""",
            # Whether a session's counter came from a verified TPM certification, and its public id
            # (api.session_id) so that an operator can name the boot to keep (appliance clear --keep).
            "ALTER TABLE sessions ADD COLUMN attested INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE sessions ADD COLUMN public_id TEXT",
        ],
    ),
    (
        9,
        [
            # Boot reports (attest_endpoints.boot_report): the issue time (microseconds) of
            # the stateless nonce of the last report accepted for the appliance; a report
            # must carry a newer one, so a replayed report is refused.
            "ALTER TABLE attestations ADD COLUMN boot_report_issued INTEGER",
        ],
    ),
]
SCHEMA_VERSION: Final = MIGRATIONS[-1][0]
