"""Exit codes of `scanner-platform` (documented in its --help and in docs/platform.md).

Every error is one line on stderr, whatever the code; --debug adds the traceback.
Codes are part of the interface scripts rely on: never renumber one, only add.
"""

from __future__ import annotations

from typing import Final

# The command did what it was asked.
OK: Final = 0
# A runtime failure: cannot listen, interrupted, or an unexpected error (rerun with --debug).
FAILURE: Final = 1
# Usage error: bad flags, names, specs or input files (argparse also exits with 2).
USAGE: Final = 2
# No such appliance, job, credential or result.
NOT_FOUND: Final = 3
# Contradicts the stored state: exists already, deactivated, not active, not quarantined.
CONFLICT: Final = 4
# State directory problem: not initialised, unsafe permissions, database from a newer
# version or unreachable.
STATE: Final = 5
# A job's targets lie outside its credential's scope (or the credential has none).
SCOPE: Final = 6
# Deactivation committed but destruction of the wrapped keyslot passphrase not proven:
# rerun the same command once the readers holding the old pages are gone.
UNPROVEN: Final = 7
