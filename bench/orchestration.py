"""Figure 3: what a round costs when there is no work in it.

The aggregator is the real daemon (`grbfl run`, its own process, as the simulator
starts it) running the ``balls`` strategy over a real Mosquitto. The participants
are the real ``Participant`` daemon class, all in this process, with the one piece
of work replaced: each answers every order at once with an empty set of balls. So
the round still goes through everything the daemons do around the work: the
announcement, status changes, encoding, chunked upload, reassembly, validation, an
(empty) merge, evaluation of the model on a tiny test set, the checkpoint and the
metrics. The figure is the aggregator's own round time from its metrics, median
over the rounds after the first.

Baseline: the bare MQTT exchange of a round through the same broker, one client
announcing and every participant's client answering with one small message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
from PIL import Image

import grbfl.participant
from bench.context import Context
from bench.report import Figure, Goal
from grbfl.balls import BallSet
from grbfl.broker import PrivateBroker
from grbfl.config import config_from_dict, dump_toml
from grbfl.participant import Participant
from grbfl.simulate import Federation, SimOptions, node_config

GROUP = "3 orchestration"
GOALS = {
    3: Goal("value", "<=", 0.5, "< 0.5 s"),
    50: Goal("value", "<=", 2.0, "< 2 s"),
}
# A round that takes longer than this has hung.
_RUN_TIMEOUT_S = 600.0
# Pixel balls: what an empty update of the balls strategy carries per ball.
_PIXEL_DIMS = 3 * 32 * 32
# The bare clients send small messages at once, as grbfl's Link does.
_NO_DELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def tiny_image_folder(root: Path, classes: Sequence[str]) -> Path:
    """One random 32x32 PNG per class: a test set that costs nothing to evaluate."""
    rng = np.random.default_rng(0)
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "0.png")
    return root


def empty_update(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Stands in for participant_work: no training, no clustering, no balls."""
    return {
        "samples": 10,
        "timings": {"cluster_s": 0.0},
        "balls": BallSet.empty(_PIXEL_DIMS).to_arrays(),
        "ball_report": {"found": 0, "kept": 0},
    }


async def _participants(configs: list[dict[str, Any]], aggregator: Any) -> None:
    """Run participant daemons until the aggregator's process ends."""
    nodes = [
        Participant(
            config_from_dict(raw, f"<{raw['node']['id']}>"), exit_when_done=True
        )
        for raw in configs
    ]
    tasks = [asyncio.create_task(node.serve(), name=node.node_id) for node in nodes]
    ended = asyncio.create_task(asyncio.to_thread(aggregator.wait), name="agg")
    try:
        await asyncio.wait_for(asyncio.gather(ended, *tasks), _RUN_TIMEOUT_S)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def product_rounds(ctx: Context, broker: PrivateBroker, count: int) -> list[float]:
    """Seconds of each round of a no-work federation of count participants."""
    workdir = ctx.scratch(f"orchestration-{count}")
    classes = tuple(f"class{label}" for label in range(10))
    data = tiny_image_folder(workdir / "images", classes)
    rounds = ctx.pick(full=4, quick=3, tiny=2)
    opts = SimOptions(
        participants=count,
        rounds=rounds,
        strategy="balls",
        model="cnn",
        deadline_s=120.0,
        lr=0.05,
        augment=False,
    )
    common = {"host": broker.host, "port": broker.port, "classes": classes}
    agg_state = workdir / "aggregator"
    agg_config = workdir / "aggregator.toml"
    agg_config.write_text(
        dump_toml(
            node_config(
                opts,
                role="aggregator",
                node="aggregator",
                data_dir=data,
                state_dir=agg_state,
                **common,
            )
        )
    )
    participants = [
        node_config(
            opts,
            role="participant",
            node=f"p{i}",
            data_dir=data,
            state_dir=workdir / f"p{i}",
            **common,
        )
        for i in range(1, count + 1)
    ]
    fed = Federation(workdir, broker.host, broker.port, {"aggregator": agg_config})

    # The one change to the participants: their work is an empty answer.
    real_work = grbfl.participant.participant_work
    grbfl.participant.participant_work = empty_update  # type: ignore[assignment]
    quiet = logging.getLogger("grbfl")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        aggregator = fed.start("aggregator")
        asyncio.run(_participants(participants, aggregator))
    finally:
        grbfl.participant.participant_work = real_work
        quiet.setLevel(level)
        fed.stop_all()
    if aggregator.returncode != 0:
        tail = fed.log_tail("aggregator")
        raise RuntimeError(f"aggregator exited with {aggregator.returncode}:\n{tail}")
    records = [
        json.loads(line)
        for line in (agg_state / "metrics.jsonl").read_text().splitlines()
        if line
    ]
    return [float(r["seconds"]["round"]) for r in records]


async def bare_exchange(broker: PrivateBroker, count: int, repeats: int) -> list[float]:
    """Seconds for one announcement to draw count answers through the broker."""
    answers: asyncio.Queue[None] = asyncio.Queue()

    async def respond(index: int, ready: asyncio.Event) -> None:
        async with aiomqtt.Client(
            broker.host,
            broker.port,
            identifier=f"bare-{index}",
            socket_options=_NO_DELAY,
        ) as client:
            await client.subscribe("bare/run", qos=1)
            ready.set()
            async for message in client.messages:
                await client.publish(f"bare/updates/{index}", b"x" * 64, qos=1)
                del message

    async def collect(client: aiomqtt.Client) -> None:
        async for _ in client.messages:
            answers.put_nowait(None)

    readies = [asyncio.Event() for _ in range(count)]
    responders = [
        asyncio.create_task(respond(i, readies[i]), name=f"bare-{i}")
        for i in range(count)
    ]
    times = []
    try:
        async with aiomqtt.Client(
            broker.host,
            broker.port,
            identifier="bare-agg",
            socket_options=_NO_DELAY,
        ) as agg:
            await agg.subscribe("bare/updates/+", qos=1)
            collector = asyncio.create_task(collect(agg), name="bare-collect")
            await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 60)
            for _ in range(repeats):
                started = time.perf_counter()
                await agg.publish("bare/run", b'{"round": 1}', qos=1)
                for _ in range(count):
                    await asyncio.wait_for(answers.get(), 60)
                times.append(time.perf_counter() - started)
            collector.cancel()
    finally:
        for task in responders:
            task.cancel()
        await asyncio.gather(*responders, return_exceptions=True)
    return times


def run(ctx: Context) -> list[Figure]:
    figures = []
    for count in ctx.pick(full=[3, 50], quick=[3, 50], tiny=[3]):
        with PrivateBroker(ctx.scratch(f"orchestration-broker-{count}")) as broker:
            ctx.say(f"orchestration: no-work rounds with {count} participants")
            rounds = product_rounds(ctx, broker, count)
            ctx.say(f"orchestration: bare exchange with {count} clients")
            bare = asyncio.run(bare_exchange(broker, count, 5))
        # The first round also pays for warming up (first evaluation, first
        # checkpoint); the figure is the rounds after it.
        steady = rounds[1:] or rounds
        figures.append(
            Figure(
                GROUP,
                f"round without work, {count} participants",
                statistics.median(steady),
                "s",
                statistics.median(bare),
                "bare MQTT announce and answers",
                GOALS.get(count),
                note=f"median of rounds 2..{len(rounds)} (round 1: {rounds[0]:.2f} s)",
                detail={"rounds_s": rounds, "bare_s": bare},
            )
        )
    return figures
