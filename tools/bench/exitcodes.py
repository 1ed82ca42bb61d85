"""Every exit code of the benchmark programs (docs/bench.md): ``python -m tools.bench`` and
the benchmark's own filesystems (zerofs, passthrough: tools/bench/fusemain.py).

``make bench`` and the smoke test branch on them; a number keeps its meaning.
"""

from __future__ import annotations

from typing import Final

# tools.bench: every measurement succeeded. zerofs/passthrough: unmounted cleanly.
EXIT_OK: Final = 0
# tools.bench: some measurement failed (the outputs are still written, the failures listed
# in them). zerofs/passthrough: the mount or the daemon failed.
EXIT_FAILED: Final = 1
# Usage or environment error, one line on stderr: bad flags, not root, unknown target or
# workload, missing program (argparse uses 2 as well).
EXIT_USAGE: Final = 2
# tools.bench: interrupted by Ctrl-C or SIGTERM (128 + SIGINT, as a shell reports it);
# partial outputs are written.
EXIT_INTERRUPTED: Final = 130
