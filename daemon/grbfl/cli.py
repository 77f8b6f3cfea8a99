"""The `grbfl` command: run, simulate, balls, watch, plot."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from .config import StrategyConfig, TrainingConfig
from .errors import ConfigError, GrbflError, UsageError

log = logging.getLogger("grbfl")

EXIT_ERROR = 1
EXIT_USAGE = 2
# sysexits' EX_CONFIG: the unit file tells systemd not to restart on it, since a
# broken config stays broken until an operator fixes it.
EXIT_CONFIG = 78
EXIT_INTERRUPTED = 130


# syslog priorities, which the journal reads from a "<N>" line prefix, so that
# `journalctl -p warning` finds the daemon's warnings (sd-daemon(3)).
_JOURNAL_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class _JournalFormatter(logging.Formatter):
    """Lines for the journal: its own time stamps, our priority on every line."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_JOURNAL_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def _stderr_is_journal() -> bool:
    """Whether stderr is the journal stream systemd gave us (JOURNAL_STREAM)."""
    try:
        device, inode = (int(n) for n in os.environ["JOURNAL_STREAM"].split(":"))
        stat = os.fstat(sys.stderr.fileno())
    except (KeyError, ValueError, OSError):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if _stderr_is_journal():
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    # paho and aiomqtt are chatty at DEBUG; keep them at our level or above INFO.
    for noisy in ("aiomqtt", "paho"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.root.level))


def _cmd_run(args: argparse.Namespace) -> int:
    import torch

    from .config import load_config

    config = load_config(args.config)
    if config.training.threads:
        # torch and the BLAS/OpenMP pools under scikit-learn each size themselves
        # to the machine; several daemons on one box would oversubscribe it.
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(config.training.threads)
        threadpool_limits(config.training.threads)
    if config.node.role == "aggregator":
        from .aggregator import Aggregator

        node: object = Aggregator(config, exit_when_done=args.exit_when_done)
    else:
        from .participant import Participant

        node = Participant(config, exit_when_done=args.exit_when_done)
    asyncio.run(node.serve())  # type: ignore[attr-defined]
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import SimOptions, format_table, simulate

    opts = SimOptions(
        data=args.data,
        test_data=args.test_data,
        participants=args.participants,
        rounds=args.rounds,
        strategy=args.strategy,
        model=args.model,
        partition=args.partition,
        limit=args.limit,
        json_path=args.json,
        broker=args.broker,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        augment=args.augment,
        n_clusters=args.n_clusters,
        variance_threshold=args.variance_threshold,
        min_size=args.min_size,
        embedding_variance_threshold=args.embedding_variance_threshold,
        shape_rank=args.shape_rank,
        server_samples=args.server_samples,
        server_epochs=args.server_epochs,
        deadline_s=args.deadline,
        seed=args.seed,
        workdir=args.workdir,
        keep=args.workdir is not None,
    )
    # SIGTERM (systemd, timeout, kill) stops the federation like Ctrl-C does:
    # every process started, the broker included, is stopped on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    result = simulate(opts)
    result["command"] = "grbfl " + " ".join(sys.argv[1:])
    print(format_table(result))
    if args.json:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_suffix(args.json.suffix + ".tmp")
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            tmp.replace(args.json)
        except OSError as exc:
            raise GrbflError(f"--json {args.json}: cannot write: {exc}") from exc
        print(f"results written to {args.json}")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _cmd_balls(args: argparse.Namespace) -> int:
    from .tuning import ball_sweep

    ball_sweep(args)
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    from .watch import watch

    asyncio.run(watch(args))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plots import load_all_results, plot_results

    # Files of another kind are skipped here, once, with a warning each.
    usable = [r.path for r in load_all_results(args.results)]
    for path in plot_results(usable, args.out):
        print(f"wrote {path}")
    if args.tensorboard is not None:
        from .plots import write_tensorboard

        for path in write_tensorboard(usable, args.tensorboard):
            print(f"wrote TensorBoard scalars to {path}")
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected numbers like 0.01,0.03: {text}"
        ) from exc


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected integers like 100,300: {text}"
        ) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grbfl",
        description="Granular-ball federated learning for a home lab.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging threshold (default INFO)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon for one device")
    run.add_argument("--config", type=Path, required=True, help="TOML config file")
    run.add_argument(
        "--exit-when-done",
        action="store_true",
        help="exit once the run's last round is aggregated (simulations)",
    )
    run.set_defaults(func=_cmd_run)

    sim = sub.add_parser(
        "simulate", help="a whole federation on this machine, one process per device"
    )
    sim.add_argument(
        "--data",
        type=Path,
        help="training image folder (default: "
        "scikit-learn's digits, exported as PNG files)",
    )
    sim.add_argument("--test-data", type=Path, help="held-out image folder")
    sim.add_argument("--participants", type=int, default=3, help="default 3")
    sim.add_argument("--rounds", type=int, default=5, help="default 5")
    sim.add_argument(
        "--strategy",
        default="grbfl",
        choices=["grbfl", "balls", "fedavg", "centralized"],
        help="default grbfl",
    )
    sim.add_argument("--model", default="cnn", choices=["cnn", "resnet18"])
    sim.add_argument(
        "--partition", default="iid", help="iid (default) or dirichlet:ALPHA"
    )
    sim.add_argument(
        "--limit", type=int, default=0, help="use at most N training images (0 = all)"
    )
    sim.add_argument("--json", type=Path, help="write the results here")
    sim.add_argument(
        "--broker",
        help="HOST:PORT of a running broker (default: start a private Mosquitto)",
    )
    sim.add_argument("--local-epochs", type=int, default=TrainingConfig.local_epochs)
    sim.add_argument("--batch-size", type=int, default=TrainingConfig.batch_size)
    sim.add_argument(
        "--lr", type=float, help="learning rate (default 0.05; 0.02 for the digits)"
    )
    sim.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random crops and flips while training "
        "(default: on for --data, off for the bundled digits)",
    )
    sim.add_argument(
        "--n-clusters",
        type=int,
        default=StrategyConfig.n_clusters,
        help="balls a participant aims for (default 100)",
    )
    sim.add_argument(
        "--variance-threshold", type=float, default=StrategyConfig.variance_threshold
    )
    sim.add_argument("--min-size", type=int, default=StrategyConfig.min_size)
    sim.add_argument(
        "--embedding-variance-threshold",
        type=float,
        default=StrategyConfig.embedding_variance_threshold,
        help="grbfl: share an embedding ball only above this fraction of a "
        "class's spread (default 0)",
    )
    sim.add_argument(
        "--shape-rank",
        type=int,
        default=StrategyConfig.shape_rank,
        help="grbfl: directions per class sent as its shape, 0 for none (default 16)",
    )
    sim.add_argument(
        "--server-samples",
        type=int,
        default=StrategyConfig.server_samples,
        help="samples the aggregator draws from the balls per round",
    )
    sim.add_argument("--server-epochs", type=int, default=StrategyConfig.server_epochs)
    sim.add_argument(
        "--deadline",
        type=float,
        default=1800.0,
        help="seconds a round may take (default 1800)",
    )
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument(
        "--workdir",
        type=Path,
        help="keep configs, logs and state here, and resume an unfinished run "
        "found there (default: a temp dir, kept only if a process failed)",
    )
    sim.set_defaults(func=_cmd_simulate)

    balls = sub.add_parser(
        "balls", help="what a data folder would share as granular balls (no training)"
    )
    balls.add_argument(
        "--data", type=Path, help="image folder (default: the bundled digits)"
    )
    balls.add_argument(
        "--classes",
        help="comma-separated class list (default: the folder's sub-folders)",
    )
    balls.add_argument(
        "--thresholds",
        type=_floats,
        default=[0.01, 0.03, 0.1],
        help="variance thresholds to try (default 0.01,0.03,0.1)",
    )
    balls.add_argument(
        "--clusters",
        type=_ints,
        default=[100],
        help="n_clusters values to try (default 100)",
    )
    balls.add_argument("--min-size", type=int, default=5)
    balls.add_argument(
        "--limit", type=int, default=0, help="use at most N images (0 = all)"
    )
    balls.add_argument("--json", type=Path, help="write the sweep here")
    balls.set_defaults(func=_cmd_balls)

    watch = sub.add_parser("watch", help="a decoded live view of a federation")
    watch.add_argument("--broker", default="localhost:1883", help="HOST:PORT")
    watch.add_argument("--federation", default="lab")
    watch.add_argument("--username")
    watch.add_argument("--password")
    watch.add_argument("--tls-ca", type=Path)
    watch.add_argument(
        "--count",
        type=int,
        default=0,
        help="stop after N messages (0 = run until Ctrl-C)",
    )
    watch.set_defaults(func=_cmd_watch)

    plot = sub.add_parser("plot", help="PNG plots from simulate --json results")
    plot.add_argument("results", type=Path, nargs="+")
    plot.add_argument("--out", type=Path, default=Path("results/plots"))
    plot.add_argument(
        "--tensorboard",
        type=Path,
        metavar="LOGDIR",
        help="also write TensorBoard scalars here (needs tensorboard)",
    )
    plot.set_defaults(func=_cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        _say_error("configuration error", exc)
        return EXIT_CONFIG
    except UsageError as exc:
        _say_error("error", exc)
        return EXIT_USAGE
    except GrbflError as exc:
        _say_error("error", exc)
        return EXIT_ERROR
    except OSError as exc:
        # A folder that cannot be made, a file that cannot be written: the
        # message names the path, a traceback would add nothing for a user.
        _say_error("error", exc)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        _say_error("interrupted", exc)
        return EXIT_INTERRUPTED


def _say_error(kind: str, exc: BaseException) -> None:
    """The error on stderr, then each note added on its way up (add_note)."""
    text = str(exc)
    print(f"grbfl: {kind}: {text}" if text else f"grbfl: {kind}", file=sys.stderr)
    for note in getattr(exc, "__notes__", ()):
        print(f"grbfl: {note}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
