"""Figure 5: peak memory of a participant in a ResNet-18 round.

A one-participant federation, set up and started as `grbfl simulate` does it (its
own `grbfl run` processes and a private Mosquitto), runs one round of the default
strategy (grbfl: local training with batch 64, then embedding and clustering) with
ResNet-18 on a few hundred CIFAR-10 images; the aggregator evaluates on a tiny test
set so the round is short. The figure is the participant process's peak resident
memory (VmHWM), read while it runs.

Baseline: a bare process that imports torch, builds the same ResNet-18 and takes
training steps with batch 64 and SGD with momentum, with as many threads: what
training alone needs.
"""

from __future__ import annotations

import subprocess
import sys
import time

from bench.context import Context
from bench.orchestration import tiny_image_folder
from bench.report import Figure, Goal
from grbfl.broker import PrivateBroker
from grbfl.data import discover_classes, export_digits
from grbfl.simulate import SimOptions, prepare

GROUP = "5 memory"
GOAL = Goal("value", "<=", 2000.0, "<= 2,000 MB")
BATCH = 64
# A run longer than this has hung.
_RUN_TIMEOUT_S = 1800.0
_POLL_S = 0.1

# Peak memory comes from /proc (VmHWM), not getrusage: a child's ru_maxrss starts
# from its parent's resident size at the fork, gigabytes here.
_BARE_TRAINING = """
import sys, torch
from grbfl.models import build_model
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
model = build_model(sys.argv[2], 10)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
x = torch.rand(int(sys.argv[3]), 3, 32, 32)
y = torch.randint(0, 10, (int(sys.argv[3]),))
model.train()
for _ in range(3):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
with open("/proc/self/status", encoding="ascii") as fh:
    print(next(line.split()[1] for line in fh if line.startswith("VmHWM:")))
"""


def peak_kib(pid: int) -> int | None:
    """A process's peak resident memory so far, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def bare_training_mb(model: str, threads: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _BARE_TRAINING, str(threads), model, str(BATCH)],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.split()[-1]) * 1024 / 1e6


def participant_peak_mb(ctx: Context, model: str, images: int) -> tuple[float, int]:
    """Peak RSS of the one participant of a one-round federation; its threads."""
    workdir = ctx.scratch("memory")
    if ctx.data is not None and ctx.mode != "tiny":
        train = ctx.data / "train"
    else:
        train, _ = export_digits(ctx.scratch("digits"))
    test = tiny_image_folder(workdir / "test", discover_classes(train))
    opts = SimOptions(
        data=train,
        test_data=test,
        participants=1,
        rounds=1,
        strategy="grbfl",
        model=model,
        limit=images,
        batch_size=BATCH,
        local_epochs=1,
        quiet=True,
    )
    with PrivateBroker(workdir / "broker") as broker:
        fed, _ = prepare(opts, workdir, broker.host, broker.port)
        try:
            for node in fed.configs:
                fed.start(node)
            participant = fed.processes["p1"]
            aggregator = fed.processes["aggregator"]
            peak = 0
            deadline = time.monotonic() + _RUN_TIMEOUT_S
            while aggregator.poll() is None and time.monotonic() < deadline:
                seen = peak_kib(participant.pid)
                if seen is not None:
                    peak = max(peak, seen)
                if participant.poll() not in (None, 0):
                    break
                time.sleep(_POLL_S)
            if aggregator.returncode != 0 or participant.poll() not in (None, 0):
                raise RuntimeError(
                    "the memory federation failed:\n"
                    f"{fed.log_tail('aggregator')}\n{fed.log_tail('p1')}"
                )
        finally:
            fed.stop_all()
    return peak * 1024 / 1e6, fed.threads.get("p1", 0)


def run(ctx: Context) -> list[Figure]:
    model = ctx.pick(full="resnet18", quick="resnet18", tiny="cnn")
    # A full embedding batch is 512 images: the full run holds one.
    images = ctx.pick(full=512, quick=192, tiny=128)
    ctx.say(f"memory: one {model} round of a participant with {images} images")
    peak, threads = participant_peak_mb(ctx, model, images)
    ctx.say("memory: bare training steps")
    bare = bare_training_mb(model, threads or 1)
    return [
        Figure(
            GROUP,
            f"participant peak RSS, {model} round, batch {BATCH}",
            peak,
            "MB",
            bare,
            "bare torch training steps",
            GOAL,
            note=f"{images} local images ({images * 12 / 1024:.0f} MiB as float "
            f"pixels); VmHWM in MB of 10^6 bytes",
            detail={"threads": threads, "images": images},
        )
    ]
