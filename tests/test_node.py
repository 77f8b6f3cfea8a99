"""Real daemon processes as systemd and an operator see them.

Each test starts `grbfl run` processes against a real Mosquitto: under a fake
NOTIFY_SOCKET (a datagram socket the test binds, as systemd does), and with a fake
thermal file that the test heats and cools. What the daemons say is read where
systemd and operators read it: the notify socket and `mosquitto_sub`.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from grbfl.broker import PrivateBroker, free_port
from grbfl.config import dump_toml
from grbfl.data import discover_classes
from notify_socket import NotifySocket

pytestmark = [pytest.mark.broker, pytest.mark.slow]

FED = "t"
# WATCHDOG_USEC as systemd would pass it; the daemon pings every half of it.
WATCHDOG_USEC = 3_000_000
PING_INTERVAL_S = WATCHDOG_USEC / 2 / 1e6
# Importing torch takes about 10 s on a busy two-core machine; a round on 200
# digits a few more.
START_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 300.0
# Long enough that the pause shows clearly in the metrics.
HOT_FOR_S = 3.0


# --- helpers --------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll condition until it holds; fail naming what did not happen."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def write_config(
    path: Path,
    role: str,
    node: str,
    port: int,
    data_dir: Path,
    **sections: dict[str, Any],
) -> Path:
    """A small daemon config: one fast fedavg round on the digits."""
    config: dict[str, dict[str, Any]] = {
        "node": {"role": role, "id": node, "federation": FED},
        "broker": {"host": "127.0.0.1", "port": port},
        "data": {"dir": str(data_dir), "classes": list(discover_classes(data_dir))},
        "training": {"batch_size": 32, "threads": 1, "augment": False},
        "rounds": {"rounds": 1, "deadline_s": 120.0, "min_participants": 1},
        "strategy": {"name": "fedavg"},
        "health": {"interval_s": 0.5},
        "state": {"dir": str(path.parent / f"state-{node}")},
    }
    if role == "participant":
        config["data"]["limit"] = 200
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path.write_text(dump_toml(config))
    return path


class Daemons:
    """`grbfl run` processes, each logging to a file; all stopped at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self, name: str, config: Path, *, journal: bool = False, **env: str
    ) -> None:
        """Start a daemon; journal: its log file stands for the journal's stream."""
        with open(self.log(name), "wb") as log_file:
            if journal:
                stat = os.fstat(log_file.fileno())
                env["JOURNAL_STREAM"] = f"{stat.st_dev}:{stat.st_ino}"
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "grbfl", "run", "--config", str(config)]
                + ["--exit-when-done"],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1", **env},
            )

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def logs(self) -> str:
        return "\n".join(
            f"--- {name}\n{self.log(name).read_text(errors='replace')[-3000:]}"
            for name in self.procs
        )

    def wait(self, timeout: float) -> dict[str, int]:
        """Wait for every process to exit; return their exit codes."""
        deadline = time.monotonic() + timeout
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} did not finish in time\n{self.logs()}")
        return codes

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    running = Daemons(tmp_path)
    yield running
    running.stop()


class MosquittoSub:
    """`mosquitto_sub -v` on the federation's JSON topics, as an operator runs it."""

    def __init__(self, port: int, topics: list[str], out: Path) -> None:
        binary = shutil.which("mosquitto_sub")
        if binary is None:
            pytest.skip(
                "mosquitto_sub is not installed (apt install mosquitto-clients)"
            )
        self.out = out
        args = [binary, "-h", "127.0.0.1", "-p", str(port), "-v", "-q", "1"]
        for topic in topics:
            args += ["-t", topic]
        self._file = open(out, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self._file, stderr=subprocess.STDOUT)

    def lines(self) -> list[tuple[str, Any]]:
        """(topic, JSON body) per line received so far."""
        found = []
        for line in self.out.read_text(errors="replace").splitlines():
            topic, _, body = line.partition(" ")
            try:
                found.append((topic, json.loads(body)))
            except json.JSONDecodeError:
                continue  # a line still being written
        return found

    def bodies(self, suffix: str) -> list[Any]:
        return [body for topic, body in self.lines() if topic.endswith(suffix)]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        self._file.close()


def write_temperature(path: Path, celsius: float) -> None:
    """Replace the fake thermal file at once, as the kernel's reads never tear."""
    scratch = path.with_suffix(".new")
    scratch.write_text(f"{round(celsius * 1000)}\n")
    os.replace(scratch, path)


# --- systemd's view -------------------------------------------------------------------


def test_daemons_tell_systemd_ready_watchdog_and_status_through_a_round(
    tmp_path: Path, daemons: Daemons, digits_dirs: tuple[Path, Path]
) -> None:
    """Both roles ping the watchdog at half WATCHDOG_USEC from start to end, say
    READY=1 only once the broker is reachable, change STATUS= with role, round and
    phase as a round runs, and say STOPPING=1 last."""
    train_dir, test_dir = digits_dirs
    port = free_port()
    agg_conf = write_config(tmp_path / "agg.toml", "aggregator", "agg", port, test_dir)
    p1_conf = write_config(tmp_path / "p1.toml", "participant", "p1", port, train_dir)
    sockets = {
        name: NotifySocket(tmp_path / f"{name}.notify") for name in ("agg", "p1")
    }
    try:
        # Start both daemons while no broker listens on their port.
        for name, conf in (("agg", agg_conf), ("p1", p1_conf)):
            daemons.start(
                name,
                conf,
                NOTIFY_SOCKET=str(sockets[name].path),
                WATCHDOG_USEC=str(WATCHDOG_USEC),
            )
        wait_until(
            lambda: all(len(s.times_of("WATCHDOG")) >= 3 for s in sockets.values()),
            START_TIMEOUT_S,
            "watchdog pings from both daemons",
        )
        assert all(s.times_of("READY") == [] for s in sockets.values())

        # Bring the broker up: now they are ready, and run one round.
        with PrivateBroker(tmp_path / "broker", port=port):
            wait_until(
                lambda: all(s.times_of("READY") for s in sockets.values()),
                START_TIMEOUT_S,
                "READY=1 from both daemons",
            )
            codes = daemons.wait(RUN_TIMEOUT_S)
    finally:
        for s in sockets.values():
            s.stop()

    assert codes == {"agg": 0, "p1": 0}, daemons.logs()
    for name, sock in sockets.items():
        # Exactly one READY, after the loop had been pinging for a while.
        pings = sock.times_of("WATCHDOG")
        assert len(sock.times_of("READY")) == 1
        assert sock.times_of("READY")[0] > pings[2]
        # The cadence systemd asked for, and never a gap it would kill for.
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert 0.8 * PING_INTERVAL_S < statistics.median(gaps) < 1.3 * PING_INTERVAL_S
        assert max(gaps) < WATCHDOG_USEC / 1e6, f"{name}: {max(gaps):.2f} s gap"
        # STOPPING=1 is the last word.
        assert list(sock.messages[-1][1]) == ["STOPPING"]

    agg_status = sockets["agg"].values_of("STATUS")
    p1_status = sockets["p1"].values_of("STATUS")
    assert agg_status[0] == "aggregator agg: connecting to broker 127.0.0.1:" + str(
        port
    )
    run = next(s.rpartition("run ")[2] for s in agg_status if "run " in s)
    assert subsequence(
        [
            f"aggregator agg: waiting, round 1 train, run {run}",
            f"aggregator agg: aggregating, round 1 train, run {run}",
            f"aggregator agg: evaluating, round 1 train, run {run}",
            f"aggregator agg: done, round 1, run {run}",
        ],
        agg_status,
    ), agg_status
    assert subsequence(
        [
            "participant p1: loading",
            f"participant p1: training, round 1 train, run {run}",
            f"participant p1: uploading, round 1 train, run {run}",
            f"participant p1: idle, round 1 train, run {run}",
        ],
        p1_status,
    ), p1_status


def subsequence(wanted: list[str], seen: list[str]) -> bool:
    """Whether wanted appears in seen in this order, with anything in between."""
    rest = iter(seen)
    return all(any(item == s for s in rest) for item in wanted)


# --- heat -----------------------------------------------------------------------------


def test_hot_participant_pauses_and_resumes_and_metrics_show_the_time_lost(
    tmp_path: Path,
    daemons: Daemons,
    broker: PrivateBroker,
    digits_dirs: tuple[Path, Path],
) -> None:
    """A participant reading 90 C holds its order as paused-hot; at 50 C it trains.
    mosquitto_sub shows its health and status throughout, and the round's metrics
    carry the seconds it lost to heat and every node's latest health. Its log
    lines carry journal priorities."""
    train_dir, test_dir = digits_dirs
    thermal = tmp_path / "thermal_zone_temp"
    write_temperature(thermal, 90.0)
    agg_conf = write_config(
        tmp_path / "agg.toml", "aggregator", "agg", broker.port, test_dir
    )
    p1_conf = write_config(
        tmp_path / "p1.toml",
        "participant",
        "p1",
        broker.port,
        train_dir,
        health={
            "pause_at_c": 80.0,
            "resume_at_c": 70.0,
            "temperature_file": str(thermal),
        },
    )
    watcher = MosquittoSub(
        broker.port,
        [f"grbfl/{FED}/nodes/+/status", f"grbfl/{FED}/nodes/+/health"]
        + [f"grbfl/{FED}/metrics"],
        tmp_path / "mosquitto_sub.out",
    )
    try:
        daemons.start("agg", agg_conf)
        daemons.start("p1", p1_conf, journal=True)

        # Hot: the order for round 1 is held, and the operator can see why.
        wait_until(
            lambda: any(
                s["state"] == "paused-hot" and s["round"] == 1
                for s in watcher.bodies("/nodes/p1/status")
            ),
            START_TIMEOUT_S,
            "p1 paused-hot in round 1",
        )
        time.sleep(HOT_FOR_S)
        assert not any(
            s["state"] == "training" for s in watcher.bodies("/nodes/p1/status")
        )
        hot_health = watcher.bodies("/nodes/p1/health")[-1]

        # Cool: it resumes, and the round finishes.
        write_temperature(thermal, 50.0)
        codes = daemons.wait(RUN_TIMEOUT_S)
        wait_until(lambda: watcher.bodies("/metrics"), 10, "metrics")
    finally:
        watcher.stop()

    assert codes == {"agg": 0, "p1": 0}, daemons.logs()
    assert hot_health["temperature_c"] == 90.0
    assert hot_health["node"] == "p1"
    assert {"throttle", "cpu_freq_mhz", "load_avg", "memory"} <= set(hot_health)

    states = [s["state"] for s in watcher.bodies("/nodes/p1/status")]
    assert subsequence(["paused-hot", "training", "uploading", "idle"], states)

    (metrics,) = watcher.bodies("/metrics")
    assert metrics["n_participants"] == 1
    assert HOT_FOR_S <= metrics["seconds"]["heat"] < metrics["seconds"]["round"]
    assert metrics["health"]["p1"]["temperature_c"] == 50.0
    assert set(metrics["health"]) == {"agg", "p1"}
    # Under systemd the journal gets each line's priority: this one is a warning.
    p1_log = daemons.log("p1").read_text().splitlines()
    assert "<4>grbfl.node: CPU at 90.0 C: pausing new work until below 70.0 C" in p1_log
    assert "<6>grbfl.node: CPU cooled to 50.0 C: resuming" in p1_log


# --- exit statuses systemd acts on ----------------------------------------------------

# What a shutdown that leaves tasks or the broker connection behind prints.
UNCLEAN_EXIT = ("Traceback", "Task was destroyed", "Event loop is closed")


def test_missing_data_folder_exits_78_naming_file_and_key_for_both_roles(
    tmp_path: Path,
    daemons: Daemons,
    broker: PrivateBroker,
    digits_dirs: tuple[Path, Path],
) -> None:
    """Neither role can do anything without data.dir, and no restart brings it
    back: each exits with 78, which the unit does not retry, with one line naming
    the config file and the key, and shuts down without a traceback or asyncio
    complaints while its broker connection is being set up."""
    train_dir, _ = digits_dirs
    missing = tmp_path / "no-such-folder"
    for role, name in (("aggregator", "agg"), ("participant", "p1")):
        conf = write_config(
            tmp_path / f"{name}.toml",
            role,
            name,
            broker.port,
            train_dir,
            data={"dir": str(missing)},
        )
        daemons.start(name, conf)

    codes = daemons.wait(START_TIMEOUT_S)

    assert codes == {"agg": 78, "p1": 78}, daemons.logs()
    for name in ("agg", "p1"):
        text = daemons.log(name).read_text()
        assert (
            f"grbfl: configuration error: {tmp_path / name}.toml: "
            f"data.dir = '{missing}': no such folder"
        ) in text
        assert not [w for w in UNCLEAN_EXIT if w in text], text


def _as_a_plain_user() -> list[str]:
    """A command prefix under which file permissions apply: root drops the
    capabilities that bypass them (setpriv, util-linux); others need nothing."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed to test as root"
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search,-fowner"]


def test_data_folder_that_cannot_be_entered_exits_78_and_an_unreadable_class_is_named(
    tmp_path: Path, digits_dirs: tuple[Path, Path]
) -> None:
    """A data.dir listed but not searchable (a `chmod -R 644`) is a configuration
    error, exit 78 naming file and key; a class folder that cannot be read is
    skipped with a warning naming it, not silently."""
    data = tmp_path / "data"
    shutil.copytree(digits_dirs[0], data)
    classes = discover_classes(data)
    conf = write_config(tmp_path / "p1.toml", "participant", "p1", 1, data)
    data.chmod(0o666)
    try:
        done = subprocess.run(
            [*_as_a_plain_user(), sys.executable, "-m", "grbfl", "run"]
            + ["--config", str(conf)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        data.chmod(0o755)
    assert done.returncode == 78, done.stderr
    assert (
        f"grbfl: configuration error: {conf}: data.dir = '{data}': cannot enter it"
    ) in done.stderr

    (data / classes[3]).chmod(0o000)
    try:
        listing = subprocess.run(
            [*_as_a_plain_user(), sys.executable, "-c"]
            + [
                "import logging, sys; logging.basicConfig(); "
                "from grbfl.data import list_images; "
                "print(len(list_images(sys.argv[1], sys.argv[2].split(','))))",
                str(data),
                ",".join(classes),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        (data / classes[3]).chmod(0o755)
    assert listing.returncode == 0, listing.stderr
    assert f"skipping folder {data / classes[3]}: Permission denied" in listing.stderr
    total = sum(1 for p in data.rglob("*.png"))
    assert 0 < int(listing.stdout) < total
