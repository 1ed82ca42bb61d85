"""What every key-holding process shares: the scratchfs daemon, the userspace volume server, the agent.

One owner for each seam (DESIGN.md §3b), so that no key holder is weaker than another:

- `scratchfs.keyholder.hardening`: core limit 0, non-dumpable (checked), mlockall, parent-death signal
- `scratchfs.keyholder.ready`: the readiness pipe ("ok" / "err CODE MESSAGE"), writer and reader
- `scratchfs.keyholder.mountinfo`: /proc/self/mountinfo with escapes decoded; stale FUSE mounts
- `scratchfs.keyholder.procs`: pid liveness guarded against pid reuse by the start time
- `scratchfs.keyholder.wipe`: overwrite secrets held in mutable buffers
- `scratchfs.keyholder.logformat`: the one log line format (here because every program,
  key holder or not, already imports this package)

Import the modules, not this package: each one names its public API in ``__all__``.
"""
