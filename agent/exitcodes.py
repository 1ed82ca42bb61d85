"""Every exit code of ``scanner-agent`` and of its scan child (docs/agent.md, "Exit codes").

Exit codes are an interface: systemd's ``RestartPreventExitStatus`` (deploy/, tested by
tests/deploy/test_systemd_unit.py) and operators' scripts branch on them. A number keeps
its meaning forever; a new failure that needs a different action gets a new number.
Each AgentError subclass (agent/errors.py) carries exactly one of these.
"""

from __future__ import annotations

from typing import Final

# --- scanner-agent ---------------------------------------------------------------------

# Success: activation done, `--once` finished its job, or a clean shutdown on SIGTERM/SIGINT.
EXIT_OK: Final = 0
# 1 is not used: it is what Python exits with on an uncaught exception, which the agent never
# lets escape (EXIT_INTERNAL instead), so a 1 from the service means it did not even start.
# Bad command line, unreadable CA file, malformed URL or proxy (argparse also uses 2).
EXIT_USAGE: Final = 2
# 3-19 are not used: the agent runs scratchfs, whose codes are 0-19 (scratchfs/exitcodes.py),
# and reports its failures as EXIT_VOLUME / EXIT_SCRATCH; disjoint ranges keep a status in a
# log line unambiguous about which program gave it.
# State dir missing, not activated, unreadable, or with wrong owner/permissions.
EXIT_STATE: Final = 20
# State dir fails its binding check (edited platform URL, CA, certificate...): re-image.
EXIT_TAMPERED: Final = 21
# Platform unreachable, or TLS/HTTP refused for a reason a retry may fix.
EXIT_PLATFORM: Final = 22
# Activation refused (invalid or expired code) or the state dir is not empty.
EXIT_ACTIVATION: Final = 23
# The platform deactivated this appliance; the volume's keyslots were erased.
EXIT_DEACTIVATED: Final = 24
# The encrypted volume could not be formatted, opened, closed or erased.
EXIT_VOLUME: Final = 25
# scratchfs could not be mounted, or died while the agent was running.
EXIT_SCRATCH: Final = 26
# Clock synchronisation with the platform failed.
EXIT_TIME: Final = 27
# Unexpected internal error (a bug): rerun with --debug for a traceback.
EXIT_INTERNAL: Final = 28
# The keystore (TPM) is unreachable or refuses the appliance's keys.
EXIT_KEYSTORE: Final = 29
# The TPM refuses to unseal: a bound PCR changed (measured boot state changed).
EXIT_PCR: Final = 30
# The platform quarantined this appliance (suspected clone).
EXIT_QUARANTINED: Final = 31
# The platform refused the TPM's attestation (evidence, EK, AK, keys not TPM-resident), or
# `scanner-agent attest` could not attest (no EK certificate, no EK CA on the platform).
EXIT_ATTESTATION: Final = 32

# --- the scan child (``python -m agent.scan``, internal: read by agent/jobs.py) ----------

# The result document was written.
SCAN_OK: Final = 0
# The scan failed (one line on stderr); the agent reports the job as failed.
SCAN_FAILED: Final = 1
# Bad options from the agent (a bug in the agent, never a user's mistake).
SCAN_USAGE: Final = 2
