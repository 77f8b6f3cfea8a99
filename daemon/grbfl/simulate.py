"""`grbfl simulate`: a whole federation on one machine, one process per device.

Each device is a real `grbfl run` process with its own config file and state
folder, talking through a real Mosquitto; the simulator only writes the configs,
hands out disjoint partitions of the data as file lists, watches the broker to
show progress, and collects the aggregator's metrics at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np

from .broker import PrivateBroker
from .config import StrategyConfig, TrainingConfig, dump_toml
from .data import (
    discover_classes,
    export_digits,
    list_images,
    parse_partition_scheme,
    partition,
)
from .errors import GrbflError, UsageError
from .link import cancel_and_wait
from .shapes import MAX_SHAPE_RANK
from .topics import Topics

log = logging.getLogger(__name__)

FEDERATION = "sim"
DEFAULT_LR = 0.05
DIGITS_LR = 0.02
# The daemon's default warm-up (training.warmup_steps), used by the reference run.
WARMUP_STEPS = 100
# Seconds between progress lines while nothing but participant states change.
PROGRESS_EVERY_S = 10.0
# Seconds from the aggregator moving on to printing the states, so that the line
# shows the participants at the new phase's work: they take it up well within a
# second, once the order and the model have crossed the broker.
SETTLE_S = 1.0
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "grbfl"


@dataclass
class SimOptions:
    data: Path | None = None
    test_data: Path | None = None
    participants: int = 3
    rounds: int = 5
    strategy: str = "grbfl"
    model: str = "cnn"
    partition: str = "iid"
    limit: int = 0
    json_path: Path | None = None
    broker: str | None = None
    # Training and ball settings default to what a device's config file does.
    local_epochs: int = TrainingConfig.local_epochs
    batch_size: int = TrainingConfig.batch_size
    # None: 0.05 for the user's images, 0.02 for the small bundled digits.
    lr: float | None = None
    # None: on for the user's images, off for the bundled digits (not mirror-safe).
    augment: bool | None = None
    n_clusters: int = StrategyConfig.n_clusters
    variance_threshold: float = StrategyConfig.variance_threshold
    min_size: int = StrategyConfig.min_size
    embedding_variance_threshold: float = StrategyConfig.embedding_variance_threshold
    shape_rank: int = StrategyConfig.shape_rank
    server_samples: int = StrategyConfig.server_samples
    server_epochs: int = StrategyConfig.server_epochs
    deadline_s: float = 1800.0
    seed: int = 0
    workdir: Path | None = None
    keep: bool = False
    quiet: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_data(opts: SimOptions) -> tuple[Path, Path]:
    """The training and test folders; the bundled digits when none is given."""
    if opts.augment is None:
        opts.augment = opts.data is not None
    if opts.lr is None:
        # 480 digits per participant make 8 steps an epoch: a gentler rate keeps
        # the first round from diverging on them.
        opts.lr = DEFAULT_LR if opts.data is not None else DIGITS_LR
    if opts.data is None:
        if opts.test_data is not None:
            raise GrbflError("--test-data needs --data as well")
        return export_digits(DEFAULT_CACHE / "digits")
    if opts.test_data is None:
        raise GrbflError(f"--data {opts.data} needs --test-data (a held-out folder)")
    for flag, path in (("--data", opts.data), ("--test-data", opts.test_data)):
        if not path.is_dir():
            raise GrbflError(f"{flag} {path}: no such folder")
    return opts.data, opts.test_data


def _subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most `limit` indices, drawn without bias towards any class."""
    if not limit or limit >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(len(labels))[:limit])


def ball_options(opts: SimOptions) -> dict[str, Any]:
    """The [strategy] keys of a simulated federation (also kept in the results)."""
    return {
        "n_clusters": opts.n_clusters,
        "variance_threshold": opts.variance_threshold,
        "min_size": opts.min_size,
        "embedding_variance_threshold": opts.embedding_variance_threshold,
        "shape_rank": opts.shape_rank,
        "server_samples": opts.server_samples,
        "server_epochs": opts.server_epochs,
    }


def node_config(
    opts: SimOptions,
    *,
    role: str,
    node: str,
    host: str,
    port: int,
    data_dir: Path,
    classes: tuple[str, ...],
    state_dir: Path,
    files_list: Path | None = None,
    threads: int = 0,
) -> dict[str, Any]:
    """The TOML document for one simulated device."""
    data: dict[str, Any] = {"dir": str(data_dir), "classes": list(classes)}
    if files_list is not None:
        data["files_list"] = str(files_list)
    return {
        "node": {"role": role, "id": node, "federation": FEDERATION},
        "broker": {"host": host, "port": port, "keepalive": 30},
        "data": data,
        "model": {"name": opts.model, "seed": opts.seed},
        "training": {
            "local_epochs": opts.local_epochs,
            "batch_size": opts.batch_size,
            "lr": opts.lr,
            "augment": opts.augment,
            "threads": threads,
        },
        "rounds": {
            "rounds": opts.rounds,
            "deadline_s": opts.deadline_s,
            "min_participants": opts.participants,
        },
        "strategy": {"name": opts.strategy, **ball_options(opts)},
        # Simulated devices share one box: no point pausing on its temperature.
        "health": {"pause_at_c": 150.0, "resume_at_c": 140.0, "interval_s": 30.0},
        "state": {"dir": str(state_dir)},
    }


@dataclass
class Federation:
    """The files and processes of one simulated federation."""

    workdir: Path
    host: str
    port: int
    configs: dict[str, Path]
    threads: dict[str, int] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log_path(self, node: str) -> Path:
        return self.workdir / "logs" / f"{node}.log"

    def start(self, node: str) -> subprocess.Popen[bytes]:
        """Start (or restart) one device's daemon as its own process."""
        self.log_path(node).parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.threads.get(node):
            # OpenMP and BLAS pools start before our code runs; the environment is
            # the only way to size them in a child process.
            env["OMP_NUM_THREADS"] = str(self.threads[node])
            env["OPENBLAS_NUM_THREADS"] = str(self.threads[node])
        with open(self.log_path(node), "ab") as log_file:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "grbfl",
                    "run",
                    "--config",
                    str(self.configs[node]),
                    "--exit-when-done",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        self.processes[node] = proc
        return proc

    def stop_all(self, timeout: float = 10.0) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log_tail(self, node: str, lines: int = 15) -> str:
        try:
            text = self.log_path(node).read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def prepare(
    opts: SimOptions, workdir: Path, host: str, port: int
) -> tuple[Federation, Path]:
    """Write partitions and configs; return the federation and aggregator state."""
    train_dir, test_dir = resolve_data(opts)
    classes = discover_classes(train_dir)
    files = list_images(train_dir, classes)
    if not files:
        raise GrbflError(f"{train_dir}: no images found in class folders")
    labels = np.array([label for _, label in files], dtype=np.int64)
    chosen = _subset(labels, opts.limit, opts.seed)
    if len(chosen) < opts.participants:
        raise GrbflError(
            f"{len(chosen)} training images cannot be split among "
            f"{opts.participants} participants"
        )
    try:
        parts = partition(labels[chosen], opts.participants, opts.partition, opts.seed)
    except ValueError as exc:
        raise GrbflError(f"--partition {opts.partition}: {exc}") from exc

    threads = max(1, (os.cpu_count() or 1) // opts.participants)
    configs: dict[str, Path] = {}
    agg_state = aggregator_state(workdir)
    configs["aggregator"] = workdir / "aggregator.toml"
    configs["aggregator"].write_text(
        dump_toml(
            node_config(
                opts,
                role="aggregator",
                node="aggregator",
                host=host,
                port=port,
                data_dir=test_dir,
                classes=classes,
                state_dir=agg_state,
            )
        )
    )
    for i, part in enumerate(parts, start=1):
        node = f"p{i}"
        listing = workdir / f"{node}.files"
        listing.write_text("\n".join(files[j][0] for j in chosen[part]) + "\n")
        configs[node] = workdir / f"{node}.toml"
        configs[node].write_text(
            dump_toml(
                node_config(
                    opts,
                    role="participant",
                    node=node,
                    host=host,
                    port=port,
                    data_dir=train_dir,
                    classes=classes,
                    state_dir=workdir / node,
                    files_list=listing,
                    threads=threads,
                )
            )
        )
    node_threads = {node: threads for node in configs if node != "aggregator"}
    return Federation(workdir, host, port, configs, node_threads), agg_state


class Progress:
    """Prints what the federation is doing, from what it says on the broker."""

    def __init__(
        self,
        total_rounds: int,
        quiet: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total_rounds
        self.quiet = quiet
        self.clock = clock
        self.start = clock()
        self.states: dict[str, str] = {}
        self.last_line = ""
        self.last_print = 0.0
        # When the states line is next to be printed, if it says something new.
        self.due: float | None = None
        self.round = 0
        self.metrics: list[dict[str, Any]] = []

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[{self.clock() - self.start:6.0f}s] {text}", flush=True)

    def on_status(self, node: str, body: Any) -> None:
        """Print the federation's states SETTLE_S after the aggregator moves on,
        and at most every PROGRESS_EVERY_S seconds otherwise, so long rounds show
        life without a line per message."""
        if not isinstance(body, dict):
            return
        previous = self.states.get(node)
        self.states[node] = str(body.get("state"))[:20]
        if node == "aggregator" and isinstance(body.get("round"), int):
            self.round = body["round"]
        now = self.clock()
        if self.due is not None:
            pass  # a line is coming; it will show this too
        elif node == "aggregator" and previous != self.states[node]:
            self.due = now + SETTLE_S
        elif now - self.last_print >= PROGRESS_EVERY_S:
            self.due = now
        self.flush()

    def flush(self) -> None:
        """Print the states line if it is due and says something new."""
        now = self.clock()
        if self.due is None or now < self.due:
            return
        self.due = None
        line = "  ".join(f"{n}:{s}" for n, s in sorted(self.states.items()))
        if line != self.last_line:
            self.last_line = line
            self.last_print = now
            self.say(f"round {self.round}/{self.total}  {line}")

    def on_metrics(self, body: Any) -> None:
        if not isinstance(body, dict):
            return
        self.metrics.append(body)
        try:
            up_mb = float(body.get("bytes_up", 0)) / 1e6
            seconds = float(body.get("seconds", {}).get("round", 0))
            accuracy = float(body.get("accuracy", 0))
        except (TypeError, ValueError, AttributeError):
            return  # not ours to judge; the aggregator's own file is what counts
        self.say(
            f"round {body.get('round')}/{self.total} done: accuracy "
            f"{accuracy:.4f}, {up_mb:.2f} MB up, {seconds:.1f} s"
        )


async def watch_progress(host: str, port: int, progress: Progress) -> None:
    topics = Topics(FEDERATION)
    while True:
        try:
            async with aiomqtt.Client(
                host, port, identifier="grbfl-simulate"
            ) as client:
                await client.subscribe(topics.any_status)
                await client.subscribe(topics.metrics)
                async for message in client.messages:
                    topic = message.topic.value
                    payload = message.payload
                    if not isinstance(payload, bytes) or not payload:
                        continue
                    try:
                        body = json.loads(payload)
                    except ValueError:
                        continue
                    if topic == topics.metrics:
                        progress.on_metrics(body)
                    else:
                        node = topics.node_of(topic)
                        if node:
                            progress.on_status(node, body)
        except aiomqtt.MqttError:
            await asyncio.sleep(0.5)


async def supervise(fed: Federation, progress: Progress) -> None:
    """Wait for the aggregator to finish; fail fast if any process dies."""
    watcher = asyncio.create_task(
        watch_progress(fed.host, fed.port, progress), name="sim-progress"
    )
    try:
        while True:
            for node, proc in fed.processes.items():
                code = proc.poll()
                if code is None:
                    continue
                if node == "aggregator" and code == 0:
                    return
                if code != 0:
                    raise GrbflError(
                        f"{node} exited with code {code}; last lines of "
                        f"{fed.log_path(node)}:\n{fed.log_tail(node)}"
                    )
            progress.flush()
            await asyncio.sleep(0.5)
    finally:
        # Cancelled while it subscribes, the watcher can lose the cancel (see
        # cancel_and_wait) and would keep simulate waiting after Ctrl-C.
        await cancel_and_wait({watcher})


def read_metrics(agg_state: Path) -> list[dict[str, Any]]:
    """The aggregator's per-round records of its latest run, one per round."""
    path = agg_state / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            # A line cut short by a kill; the aggregator skips it as well.
            log.warning("%s:%d: not a JSON record, skipped", path, number)
            continue
        if isinstance(record, dict) and isinstance(record.get("round"), int):
            records.append(record)
    # A checkpoint moved away starts a new run in the same folder: only the latest
    # run counts.
    if records:
        records = [r for r in records if r.get("run") == records[-1].get("run")]
    # A resumed run may repeat a round it had not checkpointed; keep the last.
    by_round = {r["round"]: r for r in records}
    return [by_round[k] for k in sorted(by_round)]


def aggregator_state(workdir: Path) -> Path:
    """The simulated aggregator's state folder (checkpoints, metrics)."""
    return workdir / "aggregator"


def checkpointed_round(agg_state: Path) -> tuple[int, int | None] | None:
    """The last round the aggregator checkpointed in this folder, and the rounds
    of its run (None from checkpoints that predate the count); None if the folder
    holds no readable checkpoint (the aggregator itself deals with damaged ones)."""
    # The aggregator module imports torch: only worth it with a checkpoint to read.
    if not agg_state.is_dir() or not any(agg_state.glob("checkpoint*.cbor")):
        return None
    from .aggregator import CHECKPOINT, PREVIOUS_CHECKPOINT, read_checkpoint

    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        path = agg_state / name
        if not path.exists():
            continue
        try:
            saved = read_checkpoint(path)
        except (GrbflError, OSError):
            continue
        done, total = saved.get("round"), saved.get("rounds")
        if not isinstance(done, int):
            return None
        return done, total if isinstance(total, int) else None
    return None


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM meanwhile: a second one while the federation
    is being stopped would leave its processes running, each in its own session."""
    try:
        previous = {
            sig: signal.signal(sig, signal.SIG_IGN)
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
    except ValueError:  # not the main thread: signals go elsewhere anyway
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_federation(opts: SimOptions) -> dict[str, Any]:
    """Run a federation to the end; return its results.

    A folder made here (no --workdir) is removed at the end and on Ctrl-C; when a
    process failed it is kept for its logs, and the error says where it is.
    """
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="grbfl-sim-"))
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GrbflError(f"--workdir {workdir}: cannot create: {exc}") from exc
    with _workdir_lock(workdir):
        return _run_in(opts, workdir)


@contextlib.contextmanager
def _workdir_lock(workdir: Path) -> Iterator[None]:
    """Hold workdir for this run: a second simulate in it would resume the same run
    beside the first and both would write its metrics."""
    try:
        handle = open(workdir / ".lock", "a")  # noqa: SIM115 - closed by with
    except OSError as exc:
        raise GrbflError(f"--workdir {workdir}: cannot write: {exc}") from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                f"--workdir {workdir} is in use by another grbfl simulate; wait for "
                "it or pass another --workdir"
            ) from None
        yield


def _run_in(opts: SimOptions, workdir: Path) -> dict[str, Any]:
    broker: PrivateBroker | None = None
    started = time.monotonic()
    progress = Progress(opts.rounds, opts.quiet)
    fed: Federation | None = None
    agg_state = aggregator_state(workdir)
    failure: BaseException | None = None
    try:
        if opts.broker:
            host, port = parse_broker(opts.broker)
        else:
            # Assigned before it starts, so that Ctrl-C during the start stops it.
            broker = PrivateBroker(workdir / "broker")
            broker.start()
            host, port = broker.host, broker.port
            progress.say(f"private Mosquitto on {host}:{port}")
        found = checkpointed_round(agg_state) if opts.workdir is not None else None
        if found is not None:
            progress.say(
                f"resuming the unfinished run in {workdir} after round "
                f"{found[0]} of {opts.rounds}"
            )
        fed, agg_state = prepare(opts, workdir, host, port)
        progress.say(
            f"{opts.participants} participants + aggregator, strategy {opts.strategy}, "
            f"{opts.rounds} rounds; logs in {workdir / 'logs'}"
        )
        for node in fed.configs:
            fed.start(node)
        asyncio.run(supervise(fed, progress))
    except BaseException as exc:
        failure = exc
        raise
    finally:
        with _interrupts_held():
            if fed is not None:
                fed.stop_all()
            if broker is not None:
                broker.stop()
            if failure is not None:
                _after_failure(opts, workdir, fed, failure)
    records = read_metrics(agg_state)
    result = summarise(opts, records, time.monotonic() - started)
    if not opts.keep and opts.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _after_failure(
    opts: SimOptions, workdir: Path, fed: Federation | None, exc: BaseException
) -> None:
    """Remove a folder made here unless its logs explain a failure; say where
    they are when they do."""
    ran = fed is not None and bool(fed.processes)
    if opts.workdir is None and (not ran or isinstance(exc, KeyboardInterrupt)):
        shutil.rmtree(workdir, ignore_errors=True)
    elif opts.workdir is None:
        exc.add_note(f"logs, configs and state kept in {workdir}; delete it when done")
    elif ran and not isinstance(exc, KeyboardInterrupt):
        exc.add_note(f"logs, configs and state are in {workdir}")


def summarise(
    opts: SimOptions, records: list[dict[str, Any]], wall_s: float
) -> dict[str, Any]:
    rounds = []
    for r in records:
        entry = {
            "round": r["round"],
            "accuracy": r["accuracy"],
            "loss": r["loss"],
            "bytes_up": r.get("bytes_up", 0),
            "bytes_down": r.get("bytes_down", 0),
            "seconds": r.get("seconds", {}).get("round", 0.0),
            "phases": r.get("seconds", {}),
        }
        for key in (
            "balls_sent",
            "balls_found",
            "share_kept",
            "balls_after_merge",
            "ball_bytes",
            "shape_bytes",
            "merge_s",
            "n_participants",
        ):
            if key in r:
                entry[key] = r[key]
        rounds.append(entry)
    return {
        "strategy": opts.strategy,
        "model": opts.model,
        "participants": opts.participants,
        "partition": opts.partition,
        "data": str(opts.data) if opts.data else "sklearn-digits",
        "limit": opts.limit,
        "local_epochs": opts.local_epochs,
        "settings": {
            "batch_size": opts.batch_size,
            "lr": opts.lr,
            "augment": opts.augment,
            **ball_options(opts),
        },
        "rounds": rounds,
        "final_accuracy": rounds[-1]["accuracy"] if rounds else None,
        "wall_s": wall_s,
    }


def run_centralized(opts: SimOptions) -> dict[str, Any]:
    """The reference: one model on all the (limited) data, same total epochs."""
    import torch

    from .aggregator import round_lr
    from .data import load_image_folder
    from .models import build_model
    from .training import TrainSettings, evaluate, train

    started = time.monotonic()
    progress = Progress(opts.rounds, opts.quiet)
    train_dir, test_dir = resolve_data(opts)
    classes = discover_classes(train_dir)
    files = list_images(train_dir, classes)
    labels = np.array([label for _, label in files], dtype=np.int64)
    chosen = _subset(labels, opts.limit, opts.seed)
    progress.say(f"loading {len(chosen)} training images")
    train_set = load_image_folder(
        train_dir,
        classes,
        files=[files[i][0] for i in chosen],
        cache_dir=DEFAULT_CACHE / "images",
    )
    test_set = load_image_folder(test_dir, classes, cache_dir=DEFAULT_CACHE / "images")
    x, y = train_set.as_float(), train_set.labels
    tx, ty = test_set.as_float(), test_set.labels
    torch.set_num_threads(os.cpu_count() or 1)
    model = build_model(opts.model, len(classes), seed=opts.seed)
    records = []
    for round_ in range(1, opts.rounds + 1):
        t0 = time.perf_counter()
        settings = TrainSettings(
            epochs=opts.local_epochs,
            batch_size=opts.batch_size,
            lr=round_lr(opts.lr or DEFAULT_LR, round_, opts.rounds, "cosine"),
            schedule="constant",
            warmup_steps=WARMUP_STEPS,
            augment=bool(opts.augment),
            seed=opts.seed + round_,
        )
        stats = train(model, x, y, settings)
        t1 = time.perf_counter()
        accuracy, loss = evaluate(model, tx, ty)
        t2 = time.perf_counter()
        records.append(
            {
                "round": round_,
                "accuracy": accuracy,
                "loss": loss,
                "bytes_up": 0,
                "bytes_down": 0,
                "seconds": {
                    "round": t2 - t0,
                    "local_training": stats.seconds,
                    "evaluation": t2 - t1,
                },
            }
        )
        progress.on_metrics(records[-1])
    return summarise(opts, records, time.monotonic() - started)


def check_options(opts: SimOptions) -> None:
    """Refuse bad options before anything starts, each with a one-line reason."""
    if opts.participants < 1:
        raise GrbflError("--participants must be at least 1")
    if opts.rounds < 1:
        raise GrbflError("--rounds must be at least 1")
    if opts.limit < 0:
        raise GrbflError(f"--limit {opts.limit}: must be 0 (all) or a positive count")
    for flag, value in (
        ("--lr", DEFAULT_LR if opts.lr is None else opts.lr),
        ("--variance-threshold", opts.variance_threshold),
        ("--deadline", opts.deadline_s),
    ):
        if (
            not math.isfinite(value)
            or value < 0
            or (flag != "--variance-threshold" and value == 0)
        ):
            raise GrbflError(f"{flag} {value}: must be a finite positive number")
    for flag, count in (
        ("--local-epochs", opts.local_epochs),
        ("--batch-size", opts.batch_size),
        ("--n-clusters", opts.n_clusters),
        ("--min-size", opts.min_size),
        ("--server-samples", opts.server_samples),
        ("--server-epochs", opts.server_epochs),
    ):
        if count < 1:
            raise GrbflError(f"{flag} {count}: must be at least 1")
    if not 0 <= opts.shape_rank <= MAX_SHAPE_RANK:
        raise GrbflError(
            f"--shape-rank {opts.shape_rank}: must be 0 (no shapes) to {MAX_SHAPE_RANK}"
        )
    try:
        parse_partition_scheme(opts.partition)
    except ValueError as exc:
        raise GrbflError(f"--partition: {exc}") from exc
    if opts.workdir is not None and opts.workdir.exists() and not opts.workdir.is_dir():
        raise GrbflError(f"--workdir {opts.workdir}: exists and is not a folder")
    if opts.workdir is not None and opts.strategy != "centralized":
        # An unfinished run there is resumed (an interrupted simulation goes on
        # where it stopped); a finished one would only print its old table again.
        agg_state = aggregator_state(opts.workdir)
        # (0, None) without a checkpoint: nothing to refuse.
        done, total = checkpointed_round(agg_state) or (0, None)
        fresh = (
            f"pass a new --workdir, or remove {agg_state}/checkpoint*.cbor to start "
            "a new run in it"
        )
        if total is not None and total != opts.rounds:
            # Its learning-rate schedule spans its own count of rounds.
            if done >= total:
                held = f"a finished run of {total} rounds"
            else:
                held = (
                    f"a run of {total} rounds stopped after round {done} (rerun "
                    f"with --rounds {total} to finish it)"
                )
            raise UsageError(
                f"--workdir {opts.workdir} holds {held}, not --rounds "
                f"{opts.rounds}; " + fresh
            )
        if done >= opts.rounds:
            raise UsageError(
                f"--workdir {opts.workdir} holds a finished run ({done} rounds); "
                + fresh
            )
    if opts.json_path is not None:
        if opts.json_path.is_dir():
            raise GrbflError(f"--json {opts.json_path}: is a folder; name a file")
        parent = opts.json_path.parent
        if parent.exists() and not parent.is_dir():
            raise GrbflError(f"--json {opts.json_path}: {parent} is not a folder")
    if opts.broker:
        host, port = parse_broker(opts.broker)
        try:
            with socket.create_connection((host, port), timeout=5):
                pass
        except OSError as exc:
            raise GrbflError(f"--broker {opts.broker}: cannot connect: {exc}") from exc


def parse_broker(text: str) -> tuple[str, int]:
    host, _, port_text = text.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise GrbflError(f"--broker {text!r}: expected HOST:PORT")
    return host, int(port_text)


def simulate(opts: SimOptions) -> dict[str, Any]:
    check_options(opts)
    if opts.strategy == "centralized":
        return run_centralized(opts)
    return run_federation(opts)


def format_table(result: dict[str, Any]) -> str:
    """The per-round table printed at the end of a simulation."""
    header = (
        f"{'round':>5} {'accuracy':>8} {'loss':>7} {'up MB':>8} {'down MB':>8} "
        f"{'train s':>7} {'clust s':>7} {'xfer s':>6} {'aggr s':>6} {'round s':>7}"
    )
    title = f"strategy {result['strategy']}, model {result['model']}"
    if result["strategy"] == "centralized":
        title += ": one model on all the training data, no participants"
    else:
        title += (
            f", {result['participants']} participants, partition {result['partition']}"
        )
    lines = [title, header]
    for r in result["rounds"]:
        ph = r.get("phases", {})
        lines.append(
            f"{r['round']:>5} {r['accuracy']:>8.4f} {r['loss']:>7.4f} "
            f"{r['bytes_up'] / 1e6:>8.2f} {r['bytes_down'] / 1e6:>8.2f} "
            f"{ph.get('local_training', 0):>7.1f} {ph.get('clustering', 0):>7.1f} "
            f"{ph.get('transfer', 0):>6.1f} {ph.get('aggregation', 0):>6.1f} "
            f"{r['seconds']:>7.1f}"
        )
    if result["final_accuracy"] is not None:
        lines.append(
            f"final accuracy {result['final_accuracy']:.4f} "
            f"in {result['wall_s']:.0f} s wall time"
        )
    return "\n".join(lines)
