"""What the aggregator warns about after evaluating a round's global model.

When participants hold different classes (non-IID data), averaging can drag the
global model towards whatever the participants of the last round saw. Two signs
show on the aggregator's test set long before anyone reads a plot:

* test accuracy falls sharply from one round to the next;
* one class takes most of the predictions: the model is collapsing towards it.

Each is logged as a WARNING and named in the round's metrics record under
``alerts``, next to the numbers behind it: ``prediction_share_max`` (the largest
share of the test predictions that went to one class) and
``prediction_class_max`` (that class).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .training import Evaluation

log = logging.getLogger(__name__)

# Ten points of test accuracy lost in one round undo several rounds of progress;
# the round-to-round noise of a test set of a few thousand images is one or two.
ACCURACY_DROP = 0.10

# A class takes "most of the predictions" when its share of them is more than
# this fraction of the way from its share of the test labels to all of them: 55%
# for ten balanced classes, 75% for two. A model that merely favours a class, as
# a young one does, stays below it.
COLLAPSE_MARGIN = 0.5

ACCURACY_DROP_ALERT = "accuracy_drop"
COLLAPSE_ALERT = "prediction_collapse"


def check_round(
    round_: int,
    evaluation: Evaluation,
    previous_accuracy: float | None,
    classes: Sequence[str],
) -> dict[str, Any]:
    """The alert fields of a round's metrics record; logs each alert raised."""
    alerts: list[str] = []

    # A sharp fall since the round before.
    if (
        previous_accuracy is not None
        and previous_accuracy - evaluation.accuracy >= ACCURACY_DROP
    ):
        alerts.append(ACCURACY_DROP_ALERT)
        log.warning(
            "round %d: test accuracy fell from %.4f to %.4f in one round; "
            "participants' data may differ too much (non-IID) for this "
            "learning rate or number of local epochs",
            round_,
            previous_accuracy,
            evaluation.accuracy,
        )

    # One class taking most of the predictions.
    total = int(evaluation.predicted.sum())
    top = int(evaluation.predicted.argmax())
    share = int(evaluation.predicted[top]) / total if total else 0.0
    expected = int(evaluation.actual[top]) / total if total else 0.0
    name = classes[top] if top < len(classes) else str(top)
    if share > expected + COLLAPSE_MARGIN * (1.0 - expected):
        alerts.append(COLLAPSE_ALERT)
        log.warning(
            "round %d: class %s takes %.0f%% of the test predictions but is %.0f%% "
            "of the test labels; the global model is collapsing towards it "
            "(participants' data may be dominated by it)",
            round_,
            name,
            100 * share,
            100 * expected,
        )
    return {
        "alerts": alerts,
        "prediction_share_max": share,
        "prediction_class_max": name,
    }


def recorded_accuracy(metrics: Path, round_: int) -> float | None:
    """The accuracy a metrics file records for round_, if it records one."""
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(record, dict) and record.get("round") == round_:
            accuracy = record.get("accuracy")
            if isinstance(accuracy, int | float):
                return float(accuracy)
    return None
