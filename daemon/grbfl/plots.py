"""`grbfl plot`: PNG figures (and TensorBoard scalars) from simulate results.

Reads the JSON that ``grbfl simulate --json`` writes (see ``simulate.summarise``)
and draws three figures: accuracy per round, the variance-threshold trade-off of
the ball strategies, and where the time of a round goes. matplotlib and
tensorboard are optional extras, imported only when a figure or a log is asked for.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import GrbflError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

BALL_STRATEGIES = ("grbfl", "balls")
# Strategies drawn as horizontal reference lines on the threshold figure.
REFERENCE_STRATEGIES = ("centralized", "fedavg")
# Phases of a round in the aggregator's metrics, in the order they happen.
PHASES = ("local_training", "clustering", "transfer", "aggregation", "evaluation")
# A round's wall time minus its phases is waiting (deadlines, stragglers); shown
# only when it is more than this share of the round, to keep rounding noise out.
OTHER_MIN_SHARE = 0.01
# 150 dpi reads well on a laptop screen and in a README at 6.4 x 4.8 inches.
DPI = 150
# A threshold sweep spanning more than this factor of bytes gets a log y axis.
LOG_BYTES_SPAN = 20.0


@dataclass(frozen=True)
class Round:
    """One round of one results file, with the numbers the figures need."""

    round: int
    accuracy: float
    loss: float | None
    bytes_up: float
    bytes_down: float
    seconds: float
    phases: dict[str, float]


@dataclass(frozen=True)
class Results:
    """One results file, validated."""

    path: Path
    strategy: str
    model: str
    partition: str
    variance_threshold: float
    n_clusters: int
    rounds: tuple[Round, ...]

    @property
    def final_accuracy(self) -> float:
        return self.rounds[-1].accuracy

    @property
    def bytes_per_round(self) -> float:
        """Mean bytes up plus down per round."""
        return sum(r.bytes_up + r.bytes_down for r in self.rounds) / len(self.rounds)

    @property
    def is_ball_strategy(self) -> bool:
        return self.strategy in BALL_STRATEGIES


# --- reading ---------------------------------------------------------------------


class NotResultsError(GrbflError):
    """A readable JSON file that is not a ``grbfl simulate --json`` results file."""


def _field(
    obj: Any, key: str, kind: type | tuple[type, ...], path: Path, where: str
) -> Any:
    """obj[key] checked against kind; GrbflError naming file and key otherwise."""
    name = f"{where}{key}"
    if not isinstance(obj, dict) or key not in obj:
        raise GrbflError(f"{path}: missing key {name!r}")
    value = obj[key]
    # JSON true/false are Python ints; they are not numbers here.
    numeric = kind in (int, float, (int, float))
    if (numeric and isinstance(value, bool)) or not isinstance(value, kind):
        raise GrbflError(f"{path}: key {name!r} has the wrong type ({value!r})")
    return value


def _number(obj: Any, key: str, path: Path, where: str) -> float:
    return float(_field(obj, key, (int, float), path, where))


def _round(entry: Any, i: int, path: Path) -> Round:
    where = f"rounds[{i}]."
    phases_raw = entry.get("phases", {}) if isinstance(entry, dict) else {}
    if not isinstance(phases_raw, dict):
        raise GrbflError(f"{path}: key '{where}phases' is not a map")
    phases = {
        str(k): float(v)
        for k, v in phases_raw.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    loss = entry.get("loss") if isinstance(entry, dict) else None
    return Round(
        round=int(_field(entry, "round", int, path, where)),
        accuracy=_number(entry, "accuracy", path, where),
        loss=float(loss) if isinstance(loss, int | float) else None,
        bytes_up=_number(entry, "bytes_up", path, where),
        bytes_down=_number(entry, "bytes_down", path, where),
        seconds=_number(entry, "seconds", path, where),
        phases=phases,
    )


def load_results(path: Path) -> Results:
    """Read and check one results file; GrbflError names the file and the key."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise GrbflError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GrbflError(f"{path}: not valid JSON: {exc}") from exc
    # Another kind of document (a `grbfl balls --json` list, a config): plot skips
    # it. One with either key is a results file, and checked key by key below.
    if not isinstance(doc, dict) or not ({"strategy", "rounds"} & doc.keys()):
        kind = "an object" if isinstance(doc, dict) else f"a JSON {_json_kind(doc)}"
        raise NotResultsError(
            f"{path}: {kind}, not a `grbfl simulate --json` results object "
            "(with strategy, settings and rounds)"
        )

    strategy = _field(doc, "strategy", str, path, "")
    settings = _field(doc, "settings", dict, path, "")
    rounds_raw = _field(doc, "rounds", list, path, "")
    if not rounds_raw:
        raise GrbflError(f"{path}: key 'rounds' is empty (the run finished no round)")
    rounds = tuple(_round(entry, i, path) for i, entry in enumerate(rounds_raw))
    return Results(
        path=path,
        strategy=strategy,
        model=str(doc.get("model", "?")),
        partition=str(doc.get("partition", "?")),
        variance_threshold=_number(settings, "variance_threshold", path, "settings."),
        n_clusters=int(_field(settings, "n_clusters", int, path, "settings.")),
        rounds=rounds,
    )


def _json_kind(doc: Any) -> str:
    if isinstance(doc, list):
        return "list"
    if isinstance(doc, str):
        return "string"
    if doc is None:
        return "null"
    return "number" if not isinstance(doc, bool) else "boolean"


def load_all_results(paths: list[Path]) -> list[Results]:
    """The results files among paths; each other kind of file is skipped with a
    warning, and GrbflError if none is left."""
    if not paths:
        raise GrbflError("no results files given")
    results = []
    for path in paths:
        try:
            results.append(load_results(Path(path)))
        except NotResultsError as exc:
            log.warning("skipping %s", exc)
    if not results:
        raise GrbflError(
            f"none of the {len(paths)} file(s) given is a `grbfl simulate --json` "
            "results file"
        )
    return results


def labels_for(results: list[Results]) -> list[str]:
    """Strategy names, with what tells the files apart where they differ."""

    def differs(attr: str, among: list[Results]) -> bool:
        return len({getattr(r, attr) for r in among}) > 1

    balls = [r for r in results if r.is_ball_strategy]
    labels = []
    for r in results:
        parts = [r.strategy]
        if differs("model", results):
            parts.append(r.model)
        # variance_threshold filters pixel-space balls; grbfl's embedding balls
        # have their own relative threshold, so the pixel one says nothing there.
        if r.strategy == "balls" and differs("variance_threshold", balls):
            parts.append(f"thr {r.variance_threshold:g}")
        if r.is_ball_strategy and differs("n_clusters", balls):
            parts.append(f"k {r.n_clusters}")
        if differs("partition", results):
            parts.append(r.partition)
        labels.append(" ".join(parts))

    # Still ambiguous (repeated runs): fall back on the file names.
    return [
        f"{label} ({r.path.stem})" if labels.count(label) > 1 else label
        for label, r in zip(labels, results, strict=True)
    ]


# --- drawing ---------------------------------------------------------------------


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401 - the package itself, so a stub fails here
    except ImportError as exc:
        raise GrbflError("plots need matplotlib: pip install 'grbfl[plots]'") from exc


def _new_figure(width: float = 6.4, height: float = 4.8) -> Figure:
    """An Agg figure outside pyplot, so nothing global is touched or leaked."""
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, out: Path, name: str) -> Path:
    path = out / name
    figure.savefig(path, format="png")
    log.debug("wrote %s", path)
    return path


def plot_accuracy(results: list[Results], labels: list[str], out: Path) -> Path:
    """Test accuracy per round, one line per file."""
    figure = _new_figure()
    from matplotlib.ticker import MaxNLocator

    ax = figure.add_subplot()
    for r, label in zip(results, labels, strict=True):
        ax.plot(
            [x.round for x in r.rounds],
            [x.accuracy for x in r.rounds],
            marker="o",
            markersize=3,
            label=label,
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy per round")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(figure, out, "accuracy.png")


def _series_key(r: Results, partitions_differ: bool) -> str:
    key = f"{r.strategy} k {r.n_clusters}"
    return f"{key} {r.partition}" if partitions_differ else key


def _references(ax: Axes, refs: list[Results], value: str) -> None:
    styles = {"centralized": ":", "fedavg": "--"}
    many = len(refs) > len({r.strategy for r in refs})
    for r in refs:
        y = r.final_accuracy if value == "accuracy" else r.bytes_per_round / 1e6
        label = f"{r.strategy} {r.partition}" if many else r.strategy
        ax.axhline(y, linestyle=styles.get(r.strategy, "-."), color="grey", label=label)


def plot_thresholds(results: list[Results], out: Path) -> Path | None:
    """Final accuracy and bytes per round against the variance threshold.

    Drawn only when some ball strategy was run at two or more thresholds; each
    (strategy, n_clusters) pair is one series, repeated runs are averaged.
    """
    # Only pixel-space balls are filtered by variance_threshold (see labels_for).
    balls = [r for r in results if r.strategy == "balls"]
    if len({r.variance_threshold for r in balls}) < 2:
        return None
    partitions_differ = len({r.partition for r in results}) > 1

    # Average repeated runs of the same series at the same threshold.
    series: dict[str, dict[float, list[Results]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for r in balls:
        series[_series_key(r, partitions_differ)][r.variance_threshold].append(r)

    figure = _new_figure(width=11.0, height=4.5)
    acc_ax, bytes_ax = figure.subplots(1, 2)
    all_mb: list[float] = []
    for key, by_threshold in sorted(series.items()):
        thresholds = sorted(by_threshold)
        acc = [_mean(x.final_accuracy for x in by_threshold[t]) for t in thresholds]
        mb = [
            _mean(x.bytes_per_round for x in by_threshold[t]) / 1e6 for t in thresholds
        ]
        all_mb += mb
        acc_ax.plot(thresholds, acc, marker="o", label=key)
        bytes_ax.plot(thresholds, mb, marker="o", label=key)

    # The reference strategies do not depend on the threshold: horizontal lines.
    refs = [r for r in results if r.strategy in REFERENCE_STRATEGIES]
    _references(acc_ax, refs, "accuracy")
    _references(bytes_ax, [r for r in refs if r.strategy == "fedavg"], "bytes")
    all_mb += [r.bytes_per_round / 1e6 for r in refs if r.strategy == "fedavg"]

    for ax in (acc_ax, bytes_ax):
        ax.set_xscale("log")
        ax.set_xlabel("variance threshold")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    acc_ax.set_ylabel("final test accuracy")
    acc_ax.set_title("Accuracy against variance threshold")
    bytes_ax.set_ylabel("MB per round (up + down)")
    bytes_ax.set_title("Traffic against variance threshold")
    positive = [v for v in all_mb if v > 0]
    if positive and max(positive) / min(positive) > LOG_BYTES_SPAN:
        bytes_ax.set_yscale("log")
    return _save(figure, out, "thresholds.png")


def _mean(values: Any) -> float:
    items = list(values)
    return sum(items) / len(items)


def mean_phase_seconds(r: Results) -> dict[str, float]:
    """Mean seconds per round of each phase, plus 'other' for the unaccounted rest."""
    means = {p: _mean(x.phases.get(p, 0.0) for x in r.rounds) for p in PHASES}
    other = _mean(x.seconds for x in r.rounds) - sum(means.values())
    if other > OTHER_MIN_SHARE * _mean(x.seconds for x in r.rounds):
        means["other"] = other
    return means


def plot_phases(results: list[Results], labels: list[str], out: Path) -> Path:
    """Mean time per round, one stacked bar per file, split by phase."""
    figure = _new_figure(width=max(6.4, 1.2 * len(results) + 2.0))
    ax = figure.add_subplot()
    per_file = [mean_phase_seconds(r) for r in results]
    names = [p for p in (*PHASES, "other") if any(p in m for m in per_file)]
    positions = list(range(len(results)))
    bottoms = [0.0] * len(results)
    for name in names:
        heights = [m.get(name, 0.0) for m in per_file]
        ax.bar(
            positions,
            heights,
            bottom=bottoms,
            label=name.replace("_", " "),
            color="lightgrey" if name == "other" else None,
        )
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set_xticks(
        positions,
        labels,
        rotation=20 if len(results) > 3 else 0,
        ha="right" if len(results) > 3 else "center",
        fontsize="small",
    )
    ax.set_ylabel("seconds per round (mean)")
    ax.set_title("Where a round's time goes")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(figure, out, "phases.png")


def plot_results(paths: list[Path], out: Path) -> list[Path]:
    """Write the figures for these results files into ``out``; return their paths."""
    results = load_all_results(paths)
    labels = labels_for(results)
    _require_matplotlib()  # before creating folders the user would find empty
    out.mkdir(parents=True, exist_ok=True)

    written = [plot_accuracy(results, labels, out)]
    thresholds = plot_thresholds(results, out)
    if thresholds is not None:
        written.append(thresholds)
    written.append(plot_phases(results, labels, out))
    return written


# --- TensorBoard -----------------------------------------------------------------


def tensorboard_available() -> bool:
    """Whether write_tensorboard can run here (torch's SummaryWriter imports)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def _run_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def write_tensorboard(paths: list[Path], logdir: Path) -> list[Path]:
    """Scalars per round (accuracy, loss, bytes, seconds), one run per results file.

    Each file becomes its own run folder under ``logdir``, named by its label, so
    ``tensorboard --logdir LOGDIR`` overlays them. Returns the run folders.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise GrbflError(
            "TensorBoard logs need tensorboard: pip install 'grbfl[tensorboard]'"
        ) from exc
    results = load_all_results(paths)
    labels = labels_for(results)
    written: list[Path] = []
    for r, label in zip(results, labels, strict=True):
        run_dir = logdir / _run_name(label)
        if run_dir in written:  # same label and file stem, from different folders
            run_dir = logdir / f"{_run_name(label)}_{len(written)}"
        writer = SummaryWriter(log_dir=str(run_dir))
        try:
            for x in r.rounds:
                scalars = {
                    "accuracy": x.accuracy,
                    "loss": x.loss,
                    "bytes/up": x.bytes_up,
                    "bytes/down": x.bytes_down,
                    "seconds/round": x.seconds,
                }
                for tag, value in scalars.items():
                    if value is not None and math.isfinite(value):
                        writer.add_scalar(tag, value, global_step=x.round)
        finally:
            writer.close()
        written.append(run_dir)
    return written
