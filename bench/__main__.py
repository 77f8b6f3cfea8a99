"""`python -m bench`: measure every figure, print the table, write results.json.

python -m bench                      everything (what `make bench` runs)
python -m bench --quick              each kind of figure once, smaller
python -m bench --only wire,memory   some groups only
python -m bench --tiny --out X.json  the machinery at toy sizes (the tests)
python -m bench --show --markdown    print results.json again, measuring nothing
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import rounds
from bench.context import DEFAULT_DATA, Context
from bench.report import (
    Figure,
    earlier_figures,
    machine,
    markdown,
    read_figures,
    table,
    write_results,
)

# Groups in the order of the figures; each names the module that measures it.
GROUPS = {
    "aggregation": "bench.aggregation",
    "wire": "bench.transfer",
    "orchestration": "bench.orchestration",
    "clustering": "bench.clustering",
    "memory": "bench.memory",
    "rounds": "bench.rounds",
}
# Groups that start whole simulated federations: too slow for --tiny.
_TINY_SKIPS = ("memory", "rounds")
RESULTS = Path(__file__).resolve().parent / "results.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0]
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller, for development")
    size.add_argument("--tiny", action="store_true", help="toy sizes, for the tests")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated groups to run (of {', '.join(GROUPS)})",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file")
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="CIFAR-10 folder with train/ and test/ (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="limit torch, BLAS and OpenMP threads in this process (default: the "
        "libraries' own choice, as the daemons make it; 1 with --tiny)",
    )
    parser.add_argument("--markdown", action="store_true", help="also print Markdown")
    parser.add_argument(
        "--show",
        action="store_true",
        help="print the figures of --out as tables and measure nothing",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    wanted = list(dict.fromkeys(g.strip() for g in args.only.split(",") if g.strip()))
    unknown = [g for g in wanted if g not in GROUPS]
    if unknown:
        parser.error(
            f"--only: unknown group {unknown[0]!r}; choose from {list(GROUPS)}"
        )
    if args.only and not wanted:
        parser.error(f"--only: name at least one group of {list(GROUPS)}")
    args.groups = wanted or [g for g in GROUPS if not (args.tiny and g in _TINY_SKIPS)]
    args.mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    if args.out.is_dir():
        parser.error(f"--out {args.out}: is a folder; name a file")
    if wanted and not args.show and args.out.exists():
        # Some groups only: their figures go into the file beside the others',
        # which must be of the same mode (and readable) to be kept.
        try:
            held = json.loads(args.out.read_text(encoding="utf-8")).get("mode")
        except (OSError, ValueError, AttributeError) as exc:
            parser.error(
                f"--out {args.out}: cannot keep its other figures ({exc}); remove "
                "it or pass another --out"
            )
        if held != args.mode:
            parser.error(
                f"--out {args.out} holds figures measured in mode {held!r}, not "
                f"{args.mode!r}; measure in that mode or pass another --out"
            )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.show:
        return show_file(args.out, markdown_too=args.markdown)
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    threads = 1 if args.threads is None and args.tiny else args.threads
    if threads:
        # Toy sizes gain nothing from threads, and on a busy machine their pools
        # spin against the other work for many times the toy's own cost.
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(threads)
        threadpool_limits(threads)
    data = args.data if (args.data / "train").is_dir() else None
    started = machine()
    workdir = Path(tempfile.mkdtemp(prefix="grbfl-bench-"))
    ctx = Context(args.mode, data, workdir, quiet=args.quiet)
    if data is None and args.mode != "tiny":
        ctx.say(f"no CIFAR-10 under {args.data}: clustering and rounds use the digits")
    figures: list[Figure] = []
    try:
        for group in args.groups:
            ctx.say(f"== {group}")
            began = time.monotonic()
            module = importlib.import_module(GROUPS[group])
            figures += module.run(ctx)
            ctx.say(f"== {group} done in {time.monotonic() - began:.0f} s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    earlier: list[dict[str, Any]] = []
    if args.only:
        # Only some groups measured: the file keeps the others' latest figures.
        measured = {importlib.import_module(GROUPS[g]).GROUP for g in args.groups}
        earlier = earlier_figures(args.out, args.mode, measured)
    write_results(args.out, figures, mode=args.mode, started=started, earlier=earlier)
    show(figures, markdown_too=args.markdown)
    load = started["load_average"][0]
    print(
        f"\n{len(figures)} figures in {time.monotonic() - ctx.started:.0f} s on "
        f"{started['cores']} cores (load average {load:.1f} at the start); "
        f"written to {args.out}"
    )
    return 0


# What a results file of the wrong shape raises while it is read or printed.
_SHAPE_ERRORS = (ValueError, LookupError, TypeError, AttributeError)


def show_file(path: Path, *, markdown_too: bool) -> int:
    """--show: print a results file again; 1, with the reason, if it cannot be."""
    try:
        show(read_figures(path), markdown_too=markdown_too)
    except OSError as exc:
        print(f"python -m bench: cannot read {path}: {exc}", file=sys.stderr)
        return 1
    except _SHAPE_ERRORS as exc:
        print(
            f"python -m bench: {path} is not a results file of this bench "
            f"({type(exc).__name__}: {exc})",
            file=sys.stderr,
        )
        return 1
    return 0


def show(figures: list[Figure], *, markdown_too: bool) -> None:
    """The figures as a table, the round breakdown, and Markdown when asked."""
    print(table(figures))
    if any(fig.group == rounds.GROUP for fig in figures):
        print("\nseconds per phase of one round (figure 6):")
        print(rounds.breakdown(figures))
    if markdown_too:
        print()
        print(markdown(figures))
        if any(fig.group == rounds.GROUP for fig in figures):
            print()
            print(rounds.breakdown(figures, markdown=True))


if __name__ == "__main__":
    sys.exit(main())
