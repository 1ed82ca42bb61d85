"""``python -m agent.child PARENT_PID -- ARGV...``: exec ARGV so that it dies with the agent.

Sets PR_SET_PDEATHSIG to SIGKILL, checks that the agent is still its parent (closing the
race where the agent died before prctl), then execs. The death signal survives execve, so
a key-holding child (scratchfs) never outlives the agent: if the agent is killed, the child
is killed too and its in-memory keys with it; the next boot clears the stale mount.
The wrapper exists because ``preexec_fn`` is unsafe in a process with threads (trio has
worker threads).
"""

from __future__ import annotations

import os
import signal
import sys

from scratchfs.keyholder.hardening import die_with_parent


def main(argv: list[str]) -> int:
    """Validate arguments, arm the parent-death signal, exec the command."""
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print("agent.child: usage: PARENT_PID -- ARGV...; internal use only", file=sys.stderr)
        return 2
    if not die_with_parent(signal.SIGKILL, int(argv[0])):
        # prctl failed or the agent is already gone: do not start a key holder nobody supervises
        print("agent.child: cannot arm the parent-death signal or the agent is gone; not starting", file=sys.stderr)
        return 1
    os.execv(argv[2], argv[2:])  # noqa: S606 - argv comes from the agent itself, not a shell


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
