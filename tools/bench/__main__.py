"""``python -m tools.bench``: benchmark scratchfs against tmpfs, zerofs, passthrough, gocryptfs.

Exit codes: 0 every measurement succeeded; 1 some measurement failed (the outputs are still
written, the failures are listed in them); 2 usage or environment error (not root, unknown
target, missing tool); 130 interrupted (Ctrl-C or SIGTERM; partial outputs are written).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from scratchfs.keyholder import logformat
from tools.bench import report, runner
from tools.bench.exitcodes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from tools.bench.workloads import MIB, WORKLOADS, Sizes

PROG = "tools.bench"

QUICK = Sizes(stream_bytes=8 * MIB, fio_file_bytes=8 * MIB, fio_runtime_s=0.3, tree_files=200,
              empty_files=300, scan_scale=0.01)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _size(value: str) -> int:
    """'1G', '256M', '64K', '4096' -> bytes."""
    v = value.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(v[-1:], 1)
    try:
        n = int(v[:-1] if v[-1:] in "KMG" else v) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {value!r} (use e.g. 1G, 256M, 4K)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {value!r}")
    return n


def _config(value: str) -> tuple[str, list[str]]:
    """'wb=--writeback-cache,--no-xattr' -> ('wb', ['--writeback-cache', '--no-xattr'])."""
    name, sep, rest = value.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=ARG,ARG... (got {value!r})")
    return name, _csv(rest)


def _sizes_list(value: str) -> list[int]:
    return [_size(v) for v in _csv(value)]


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Benchmark scratchfs against a raw tmpfs directory, the zero-work pyfuse3 "
                    "floor (zerofs), a minimal pyfuse3 passthrough and gocryptfs, all over one "
                    "tmpfs, rounds interleaved; prints a Markdown table and writes JSON + "
                    "Markdown to --out.",
        epilog="Exit codes: 0 ok, 1 some measurement failed, 2 usage/environment error, "
               "130 interrupted.",
    )
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and one round (a smoke run, numbers meaningless)")
    p.add_argument("--rounds", type=int, help="rounds, interleaved across targets (default 3; "
                   "1 with --quick)")
    p.add_argument("--size", type=_size, help="streaming file size (default 1G)")
    p.add_argument("--fio-size", type=_size, help="fio file size (default 256M)")
    p.add_argument("--fio-runtime", type=float, help="seconds per fio run (default 5)")
    p.add_argument("--no-fio-direct", dest="fio_direct", action="store_false",
                   help="run fio through the page cache instead of O_DIRECT")
    p.add_argument("--tree-files", type=int, help="files in the tarball (default 6000)")
    p.add_argument("--empty-files", type=int, help="empty files for the memory test "
                   "(default 100000)")
    p.add_argument("--scale", type=float, dest="scan_scale",
                   help="size of the scan workload as a fraction of one job (default 1: 2,000 "
                        "result files, 256 MiB stream, 50,000 SQLite inserts; 0.01 with --quick)")
    p.add_argument("--targets", type=_csv, default=None,
                   help=f"comma-separated subset of {','.join(runner.BASE_TARGETS)} "
                        "(default: all that are available)")
    p.add_argument("--block-sizes", type=_sizes_list, default=[],
                   help="extra scratchfs targets, one per block size (e.g. 4K,16K,64K,128K)")
    p.add_argument("--workloads", type=_csv, default=list(WORKLOADS),
                   help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all)")
    p.add_argument("--scratchfs-arg", action="append", default=[],
                   help="extra argument for 'scratchfs mount' (repeatable, e.g. "
                        "--scratchfs-arg=--debug)")
    p.add_argument("--scratchfs-config", action="append", default=[], type=_config,
                   metavar="NAME=ARG,ARG",
                   help="one extra scratchfs target 'scratchfs-NAME' mounted with these "
                        "arguments (repeatable), e.g. --scratchfs-config "
                        "noxattr=--no-xattr: compares configurations in one interleaved run")
    p.add_argument("--fuse-arg", action="append", default=[],
                   help="extra argument for zerofs and passthrough (repeatable, e.g. "
                        "--fuse-arg=--max-tasks=1, --fuse-arg=--writeback-cache)")
    p.add_argument("--passthrough-arg", action="append", default=[],
                   help="extra argument for passthrough only (e.g. --passthrough-arg=--threads)")
    p.add_argument("--tmpfs-size", default="8G", help="size of the harness's tmpfs (default 8G)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="directory in which to create the tmpfs mount point (default: /tmp)")
    p.add_argument("--out", type=Path, default=Path("results"),
                   help="directory for the JSON and Markdown outputs (default results/)")
    p.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logformat.setup(logging.DEBUG if args.debug else logging.WARNING)
    base = QUICK if args.quick else Sizes()
    sizes = dataclasses.replace(
        base,
        **{k: v for k, v in (("stream_bytes", args.size), ("fio_file_bytes", args.fio_size),
                              ("fio_runtime_s", args.fio_runtime),
                              ("tree_files", args.tree_files),
                              ("empty_files", args.empty_files),
                              ("scan_scale", args.scan_scale)) if v is not None},
    )
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if sizes.scan_scale <= 0:
        print(f"{PROG}: --scale must be positive; got {sizes.scan_scale}", file=sys.stderr)
        return EXIT_USAGE
    if rounds < 1:
        print(f"{PROG}: --rounds must be at least 1; got {rounds}", file=sys.stderr)
        return EXIT_USAGE
    bad = [w for w in args.workloads if w not in WORKLOADS]
    if bad or not args.workloads:
        print(f"{PROG}: unknown workload(s) {','.join(bad) or '(none)'}; choose from "
              f"{','.join(WORKLOADS)}", file=sys.stderr)
        return EXIT_USAGE
    explicit = args.targets is not None
    names = args.targets if explicit else list(runner.BASE_TARGETS)
    try:
        targets = runner.make_targets(names, args.block_sizes, args.scratchfs_arg,
                                      args.fuse_arg, args.passthrough_arg,
                                      dict(args.scratchfs_config))
    except runner.BenchError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    skipped: dict[str, str] = {}
    usable = []
    for t in targets:
        why = t.available()
        if why is None:
            usable.append(t)
        elif explicit or t.name.startswith("scratchfs-"):
            print(f"{PROG}: target {t.name} is unavailable: {why}; or leave it out of "
                  "--targets", file=sys.stderr)
            return EXIT_USAGE
        else:
            skipped[t.name] = why
            print(f"note: skipping {t.name}: {why}", file=sys.stderr)
    if not usable:
        print(f"{PROG}: no target can run; see the notes above", file=sys.stderr)
        return EXIT_USAGE
    cfg = runner.RunConfig(targets=usable, rounds=rounds, sizes=sizes,
                           workloads=list(args.workloads), fio_direct=args.fio_direct,
                           tmpfs_size=args.tmpfs_size, workdir_parent=args.workdir)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        result = runner.run(cfg, progress)
    except runner.BenchError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # one line unless --debug; cleanup already ran
        if args.debug:
            raise
        print(f"{PROG}: benchmark failed: {type(e).__name__}: {e}; rerun with --debug",
              file=sys.stderr)
        return EXIT_FAILED
    result.skipped.update(skipped)
    config = {
        "rounds": rounds, "sizes": dataclasses.asdict(sizes), "workloads": cfg.workloads,
        "fio_direct": cfg.fio_direct, "quick": args.quick, "scratchfs_args": args.scratchfs_arg,
        "fuse_args": args.fuse_arg, "passthrough_args": args.passthrough_arg,
    }
    doc = report.build_document(result, config, {t.name: t.describe() for t in usable})
    jpath, mpath, text = report.write_outputs(doc, args.out)
    print(text)
    print(f"wrote {jpath} and {mpath}", file=sys.stderr)
    if result.interrupted:
        return EXIT_INTERRUPTED
    if doc["errors"] or any(s.cleanup_problems for s in result.samples):
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
