"""Every exit code of ``scanner-seal`` (documented in docs/platform.md, "scanner-seal").

Exit codes are an interface: the customer's scripts branch on them. A number keeps its
meaning forever; a new failure that needs a different action from the caller gets a new
number, never a reused one.
"""

from __future__ import annotations

from typing import Final

# The blob was written to stdout.
EXIT_OK: Final = 0
# Sealed, but the blob could not be written (stdout closed, disk full): nothing usable left.
EXIT_FAILURE: Final = 1
# The command line or its input is wrong; nothing was sealed. Covers bad flags, a malformed
# or self-contradicting scope (e.g. --allow-cleartext with --pin-tls-sha256: a pin means
# TLS), an unreadable or wrong key file, an empty or oversized secret, stdout a terminal.
# 2 is also what argparse uses for its own errors, so every usage mistake shares it.
EXIT_USAGE: Final = 2
