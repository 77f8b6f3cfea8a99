"""Whole federations: real daemon processes through a real Mosquitto."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import psutil
import pytest

from grbfl import cli, wire
from grbfl.aggregator import Aggregator
from grbfl.broker import PrivateBroker
from grbfl.config import config_from_dict
from grbfl.data import discover_classes, load_image_folder
from grbfl.errors import GrbflError, UsageError
from grbfl.shapes import SHAPE_MIN_MEMBERS
from grbfl.simulate import (
    FEDERATION,
    SETTLE_S,
    Federation,
    Progress,
    SimOptions,
    _after_failure,
    _workdir_lock,
    aggregator_state,
    check_options,
    format_table,
    prepare,
    read_metrics,
    run_federation,
    summarise,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]


class Recorder:
    """Subscribes to grbfl/# and keeps every message, like mosquitto_sub -v."""

    def __init__(self, broker: PrivateBroker) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "test-recorder")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe("grbfl/#", qos=1)
        self.client.loop_start()
        time.sleep(0.3)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def json_on(self, suffix: str) -> list[dict[str, Any]]:
        with self.lock:
            return [
                json.loads(p) for t, p, _ in self.messages if t.endswith(suffix) and p
            ]

    def updates(self) -> dict[str, list[dict[str, Any]]]:
        """Reassembled, decoded update bodies per participant."""
        out: dict[str, list[dict[str, Any]]] = {}
        assemblers: dict[str, wire.Reassembler] = {}
        with self.lock:
            messages = list(self.messages)
        for topic, payload, _ in messages:
            parts = topic.split("/")
            if parts[2] != "updates":
                continue
            node = parts[3]
            assembler = assemblers.setdefault(node, wire.Reassembler(1 << 30, 64))
            done = assembler.add(payload)
            if done is not None:
                body = wire.decode_cbor(done[1], limit=1 << 30)
                out.setdefault(node, []).append(body)
        return out


def small_options(
    tmp_path: Path, broker: PrivateBroker, **overrides: Any
) -> SimOptions:
    opts = SimOptions(
        participants=3,
        rounds=3,
        strategy="fedavg",
        broker=f"{broker.host}:{broker.port}",
        workdir=tmp_path / "sim",
        quiet=True,
        deadline_s=300,
        # Three short rounds: enough local steps on 480 digits to learn quickly.
        local_epochs=3,
        lr=0.02,
    )
    for key, value in overrides.items():
        setattr(opts, key, value)
    return opts


def test_fedavg_trains_on_digits_and_no_image_leaves_a_participant(
    tmp_path: Path, broker: PrivateBroker, digits_dirs: tuple[Path, Path]
) -> None:
    """A 3-participant FedAvg run learns, and every participant message is checked
    for raw images and per-sample arrays."""
    recorder = Recorder(broker)
    train_dir, test_dir = digits_dirs
    opts = small_options(tmp_path, broker, data=train_dir, test_data=test_dir)
    try:
        result = run_federation(opts)
    finally:
        recorder.stop()

    # It learned, round by round, with all three participants.
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3]
    assert result["final_accuracy"] > 0.8
    metrics = recorder.json_on("/metrics")
    assert [m["n_participants"] for m in metrics] == [3, 3, 3]
    assert all(m["bytes_up"] > 0 and m["bytes_down"] > 0 for m in metrics)

    # What left the participants: weights only, nothing shaped like the data.
    images = load_image_folder(train_dir, discover_classes(train_dir))
    pixel_rows = {bytes(img) for img in images.images}
    float_rows = {img.tobytes() for img in images.as_float()}
    updates = recorder.updates()
    assert set(updates) == {"p1", "p2", "p3"}
    for node, bodies in updates.items():
        for body in bodies:
            samples = body["samples"]
            assert set(body["weights"]) and "balls" not in body
            for path, array in wire.iter_arrays(body):
                assert path.startswith("/weights/"), f"{node} sent array {path}"
                assert samples not in array.shape, f"{node}: per-sample {path}"
                assert array.shape[-3:] != (3, 32, 32), f"{node}: image-shaped {path}"
                raw = array.tobytes()
                assert raw not in pixel_rows and raw not in float_rows
    # Participants published only under their own node's topics.
    for topic, _, _ in recorder.messages:
        parts = topic.split("/")
        if parts[2] in ("run", "model", "metrics"):
            continue
        assert parts[3] in {"p1", "p2", "p3", "aggregator"}


def test_aggregator_killed_between_rounds_resumes_the_same_run(
    tmp_path: Path, broker: PrivateBroker, digits_dirs: tuple[Path, Path]
) -> None:
    """SIGKILL the aggregator right after round 1 is published; a fresh process
    resumes at round 2 with the same run id and the federation finishes."""
    recorder = Recorder(broker)
    train_dir, test_dir = digits_dirs
    opts = small_options(tmp_path, broker, data=train_dir, test_data=test_dir)
    workdir = tmp_path / "sim"
    workdir.mkdir()
    fed, agg_state = prepare(opts, workdir, broker.host, broker.port)
    try:
        for node in fed.configs:
            fed.start(node)

        # Wait for round 1's metrics, then kill the aggregator without warning.
        deadline = time.monotonic() + 240
        while not recorder.json_on("/metrics"):
            assert time.monotonic() < deadline, fed.log_tail("aggregator")
            assert fed.processes["aggregator"].poll() is None, fed.log_tail(
                "aggregator"
            )
            time.sleep(0.2)
        first_run = recorder.json_on("/metrics")[0]["run"]
        fed.processes["aggregator"].send_signal(signal.SIGKILL)
        fed.processes["aggregator"].wait()
        # The broker publishes the last will once it notices the dead socket.
        until = time.monotonic() + 10
        while recorder.json_on("/nodes/aggregator/status")[-1]["state"] != "offline":
            assert time.monotonic() < until, "no last will after SIGKILL"
            time.sleep(0.1)

        fed.start("aggregator")
        assert fed.processes["aggregator"].wait(timeout=240) == 0, fed.log_tail(
            "aggregator"
        )
    finally:
        fed.stop_all()
        recorder.stop()

    records = read_metrics(agg_state)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert {r["run"] for r in records} == {first_run}
    assert "resuming run " + first_run in fed.log_path("aggregator").read_text()
    runs = recorder.json_on(f"{FEDERATION}/run")
    assert runs[-1]["phase"] == "done" and runs[-1]["run"] == first_run


def test_balls_strategy_sends_no_weights_and_only_valid_balls(
    tmp_path: Path, broker: PrivateBroker, digits_dirs: tuple[Path, Path]
) -> None:
    """In `balls`, participants publish granular balls only: no weights, each ball
    has at least min_size members and no center equals a training sample."""
    recorder = Recorder(broker)
    train_dir, test_dir = digits_dirs
    opts = small_options(
        tmp_path,
        broker,
        data=train_dir,
        test_data=test_dir,
        strategy="balls",
        rounds=2,
        n_clusters=60,
        min_size=5,
        variance_threshold=0.0,
        server_samples=3000,
        server_epochs=3,
    )
    try:
        result = run_federation(opts)
    finally:
        recorder.stop()

    assert result["final_accuracy"] > 0.3
    images = load_image_folder(train_dir, discover_classes(train_dir))
    flat = images.as_float().reshape(len(images), -1)
    updates = recorder.updates()
    assert set(updates) == {"p1", "p2", "p3"}
    for node, bodies in updates.items():
        for body in bodies:
            assert "weights" not in body
            paths = [p for p, _ in wire.iter_arrays(body)]
            assert all(p.startswith("/balls/") for p in paths), paths
            balls = body["balls"]
            assert len(balls["sizes"]) > 0
            assert balls["sizes"].min() >= 5, node
            # Distance from every shared center to its nearest training sample.
            centers = balls["centers"].astype(np.float64)
            d2 = (
                (centers**2).sum(1)[:, None]
                - 2 * centers @ flat.T.astype(np.float64)
                + (flat.astype(np.float64) ** 2).sum(1)[None, :]
            )
            assert d2.min() > 1e-6, f"{node} shared a center equal to a sample"


def test_grbfl_keeps_the_classifier_head_on_the_participants(
    tmp_path: Path, broker: PrivateBroker, digits_dirs: tuple[Path, Path]
) -> None:
    """In `grbfl`, participants send feature-extractor weights in the train phase
    and embedding balls in the embed phase; no head weight ever leaves them."""
    recorder = Recorder(broker)
    train_dir, test_dir = digits_dirs
    opts = small_options(
        tmp_path, broker, data=train_dir, test_data=test_dir, strategy="grbfl", rounds=2
    )
    try:
        result = run_federation(opts)
    finally:
        recorder.stop()

    assert result["final_accuracy"] > 0.8
    last = result["rounds"][-1]
    assert last["balls_sent"] > 0
    assert 0 < last["balls_after_merge"] <= last["balls_sent"]
    updates = recorder.updates()
    assert set(updates) == {"p1", "p2", "p3"}
    for node, bodies in updates.items():
        phases = [b["phase"] for b in bodies]
        assert phases == ["train", "embed", "train", "embed"], (node, phases)
        for body in bodies:
            names = [p for p, _ in wire.iter_arrays(body)]
            assert not any("head" in n for n in names), (node, names)
            if body["phase"] == "embed":
                assert "weights" not in body
                assert body["balls"]["sizes"].min() >= opts.min_size
                # Shapes only of classes with enough members to hide any one.
                counts = body["shapes"]["counts"]
                assert (counts >= SHAPE_MIN_MEMBERS).all(), (node, counts)


# --- `grbfl simulate` as a user runs it ---------------------------------------------


def test_ctrl_c_stops_every_process_and_removes_the_temporary_folder(
    tmp_path: Path, digits_dirs: tuple[Path, Path]
) -> None:
    """Ctrl-C once the federation's processes are up: simulate stops the broker and
    every daemon it started, removes the work folder it made, and exits 130."""
    train_dir, test_dir = digits_dirs
    command = [sys.executable, "-m", "grbfl", "simulate", "--data", str(train_dir)]
    command += ["--test-data", str(test_dir), "--participants", "2", "--limit", "60"]
    sim = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    try:
        # Started: the broker, the aggregator and both participants are running.
        deadline = time.monotonic() + 60
        while True:
            children = psutil.Process(sim.pid).children(recursive=True)
            daemons = [c for c in children if "run" in c.cmdline()]
            if len(daemons) == 3 and len(children) >= 4:
                break
            assert sim.poll() is None, sim.communicate()
            assert time.monotonic() < deadline, "the federation did not start"
            time.sleep(0.1)
        (workdir,) = tmp_path.glob("grbfl-sim-*")

        sim.send_signal(signal.SIGINT)
        out, err = sim.communicate(timeout=60)
    finally:
        if sim.poll() is None:
            sim.kill()

    assert sim.returncode == 130, out + err
    assert "participants + aggregator" in out
    assert err.strip().endswith("grbfl: interrupted"), err
    assert "Traceback" not in err
    assert not workdir.exists()
    _, alive = psutil.wait_procs(children, timeout=5)
    assert alive == []


def test_a_failed_run_keeps_its_temporary_folder_and_says_where_it_is(
    tmp_path: Path,
) -> None:
    """A process that died leaves its logs in the folder made for the run; the
    error ends with where it is and that it can be deleted. Ctrl-C removes it,
    and a folder the user named stays either way."""
    made = tmp_path / "grbfl-sim-made"
    made.mkdir()
    fed = Federation(made, "127.0.0.1", 1883, {})
    fed.processes["p1"] = subprocess.Popen([sys.executable, "-c", "pass"])
    fed.processes["p1"].wait()
    died = GrbflError("p1 exited with code 1")

    _after_failure(SimOptions(), made, fed, died)

    assert made.is_dir()
    assert died.__notes__ == [
        f"logs, configs and state kept in {made}; delete it when done"
    ]
    named = tmp_path / "named"
    named.mkdir()
    _after_failure(SimOptions(workdir=named), named, fed, KeyboardInterrupt())
    assert named.is_dir()
    _after_failure(SimOptions(), made, fed, KeyboardInterrupt())
    assert not made.exists()


def test_workdir_with_a_finished_run_is_refused_and_an_unfinished_one_resumed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--workdir naming a folder whose run is finished would only print the old
    table again: refused with exit 2, naming the folder and the way out. A run
    stopped halfway is what --workdir is for: it is accepted, to be resumed."""
    workdir = tmp_path / "sim"
    agg_state = aggregator_state(workdir)
    config = config_from_dict(
        {
            "node": {"role": "aggregator", "id": "aggregator"},
            "data": {"dir": str(tmp_path), "classes": ["a", "b"]},
            "strategy": {"name": "fedavg"},
            "rounds": {"rounds": 3},
            "state": {"dir": str(agg_state)},
        }
    )
    old = Aggregator(config)
    old.run_id = "old-run"
    old._save_checkpoint(3, {"round": 3})

    code = cli.main(["simulate", "--workdir", str(workdir), "--rounds", "3"])

    assert code == 2
    err = capsys.readouterr().err
    assert err == (
        f"grbfl: error: --workdir {workdir} holds a finished run (3 rounds); pass "
        f"a new --workdir, or remove {agg_state}/checkpoint*.cbor to start a new "
        "run in it\n"
    )
    # More rounds would not make it a longer run: its schedule spanned 3.
    with pytest.raises(UsageError, match="holds a finished run of 3 rounds, not"):
        check_options(SimOptions(workdir=workdir, rounds=5))

    # Stopped after round 1 of 3: resumed with its own count only.
    old._save_checkpoint(1, {"round": 1})
    (agg_state / "checkpoint.prev.cbor").unlink()
    check_options(SimOptions(workdir=workdir, rounds=3))
    with pytest.raises(UsageError, match="rerun with --rounds 3 to finish it"):
        check_options(SimOptions(workdir=workdir, rounds=5))


@pytest.mark.parametrize("rank", [-1, 65])
def test_shape_rank_outside_its_range_is_refused_before_anything_starts(
    rank: int,
) -> None:
    with pytest.raises(GrbflError, match=f"--shape-rank {rank}: must be 0"):
        check_options(SimOptions(shape_rank=rank))


def test_one_workdir_holds_one_simulation_at_a_time(tmp_path: Path) -> None:
    """A second simulate in a --workdir in use is refused; the folder is free
    again once the first has ended."""
    busy = pytest.raises(UsageError, match="in use by another grbfl simulate")
    with _workdir_lock(tmp_path), busy, _workdir_lock(tmp_path):
        pass
    with _workdir_lock(tmp_path):
        pass


def test_metrics_file_with_a_line_cut_short_still_reads(tmp_path: Path) -> None:
    """A record cut short by a kill is skipped (with a warning), not fatal: the
    table of the run can still be made from the other records."""
    lines = [
        json.dumps({"run": "r", "round": 1, "accuracy": 0.5}),
        '{"run": "r", "round": 2, "accur',
        json.dumps({"run": "r", "round": 2, "accuracy": 0.6}),
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    records = read_metrics(tmp_path)
    assert [(r["round"], r["accuracy"]) for r in records] == [(1, 0.5), (2, 0.6)]


def test_progress_shows_participants_at_work_after_the_aggregator_moves_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The states line waits SETTLE_S after the aggregator moves on, so it shows
    the participants training rather than idle before the order reached them."""
    now = [0.0]
    progress = Progress(3, quiet=False, clock=lambda: now[0])

    progress.on_status("aggregator", {"state": "waiting", "round": 1})
    now[0] = 0.3
    progress.on_status("p1", {"state": "training"})
    progress.on_status("p2", {"state": "training"})
    progress.flush()
    assert capsys.readouterr().out == ""
    now[0] = SETTLE_S + 0.1
    progress.flush()

    assert capsys.readouterr().out == (
        "[     1s] round 1/3  aggregator:waiting  p1:training  p2:training\n"
    )


def test_centralized_table_names_no_participants() -> None:
    result = summarise(SimOptions(strategy="centralized"), [], 1.0)

    assert format_table(result).splitlines()[0] == (
        "strategy centralized, model cnn: one model on all the training data, "
        "no participants"
    )


@pytest.mark.broker
def test_ctrl_c_while_the_broker_starts_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mosquitto runs in a session of its own: interrupted before it listens, the
    start must stop it rather than leave it behind."""
    started: list[PrivateBroker] = []

    def interrupted(self: PrivateBroker, *args: object) -> None:
        started.append(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(PrivateBroker, "_wait_listening", interrupted)
    with pytest.raises(KeyboardInterrupt):
        PrivateBroker(tmp_path / "broker").start()
    process = started[0].process
    assert process is not None and process.poll() is not None
