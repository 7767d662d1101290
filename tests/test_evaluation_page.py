"""The evaluation report page (vitrine/evaluation/report.py and its template)."""

from typing import Any

import jinja2
import numpy as np
import pandas as pd
import pytest

from tests.helpers.evaluation_report import page_report
from tests.helpers.html import HOSTILE, visible
from vitrine import pages
from vitrine.evaluation import report as report_module
from vitrine.evaluation.metrics import value_model
from vitrine.evaluation.report import confusion_section, evaluation_page, render_report


def inputs(classes: tuple[str, ...], winner: str = "bright", photo_id: str = "test-1") -> list:
    """render_report's arguments: 4 test photos, 2 of them wrong."""
    values = value_model(classes, {c: float(i + 1) for i, c in enumerate(classes)}, [], 0.5, 0.3)
    predictions = pd.DataFrame(
        {
            "id": ["test-0", photo_id, "test-2", "test-3"],
            "label": [classes[0], classes[1], classes[0], classes[1]],
            "predicted": [classes[0], classes[0], classes[1], classes[1]],
            "index": [0, 1, 2, 3],
            "confidence": [0.9, 0.8, 0.6, 0.7],
            "gain": [1.0, -0.5, -0.25, 2.0],
            "abstained": [False, False, True, False],
        }
    )
    scores: dict[str, Any] = {
        "accuracy": 0.5,
        "macro_f1": 0.5,
        "business_weighted_accuracy": 0.6,
        "business_weighted_f1": 0.55,
        "expected_value_per_1000": 562.5,
    }
    calibration = {
        "method": "temperature",
        "temperature": 1.5,
        "val_log_loss": 0.4,
        "val_log_loss_uncalibrated": 0.6,
    }
    report = page_report(classes, winner, scores, [winner, "always_phone"], calibration)
    candidates = {winner: scores, "always_phone": scores}
    reliability = [{"bin": 7, "confidence": 0.75, "accuracy": 0.5, "count": 4}]
    images = np.zeros((4, 20, 20, 3), dtype=np.uint8)
    return [report, candidates, predictions, reliability, images, values, 2]


def test_page_shows_every_section() -> None:
    text = visible(render_report(*inputs(("phone", "laptop"))))
    assert "Winner: bright, chosen on validation by business_weighted_accuracy." in text
    assert "On 4 test photos: accuracy 0.5000, business-weighted accuracy 0.6000" in text
    assert "Scored as the service runs it: model.onnx in fp32." in text
    assert "rank candidate business_weighted_accuracy accuracy macro_f1" in text
    assert "1 bright 0.6000 0.5000" in text
    assert "Per taxonomy level level classes accuracy macro F1 1 2 0.5000 0.5000" in text
    assert "Confusion matrix, classes by business value Rows: actual class." in text
    assert "calibrated on val (temperature, temperature 1.500)" in text
    assert "val log loss 0.6000 before, 0.4000 after." in text
    assert "4 photos: confidence 0.750, accuracy 0.500" in text  # the reliability dot
    assert "threshold 0.6500 review_cost 0.3000" in text
    assert "test_accuracy_when_decided" not in text  # None: left out
    assert "Costliest mistakes (2 of 2 wrong test predictions)" in text
    assert "test-1 true laptop predicted phone confidence 0.800 cost 0.50" in text
    assert "test-2 true phone predicted laptop confidence 0.600 (sent to review) cost 0.25" in text


def test_the_reviewed_production_photos_have_their_own_line() -> None:
    args = inputs(("phone", "laptop"))
    source = "catalog:reviewed/catalog.csv"
    assert "Reviewed production photos" not in visible(render_report(*args))  # none configured

    args[0]["reviewed"] = {
        "source": source,
        "n": 3,
        "accuracy": 2 / 3,
        "business_weighted_accuracy": 0.5,
    }
    text = visible(render_report(*args))
    assert (
        f"Reviewed production photos (moderators' labels, source {source}): on the 3 among the "
        "test photos, accuracy 0.6667, business-weighted accuracy 0.5000." in text
    )

    args[0]["reviewed"] = {
        "source": source,
        "n": 0,
        "accuracy": None,
        "business_weighted_accuracy": None,
    }
    text = visible(render_report(*args))
    assert f"(moderators' labels, source {source}): none among the test photos yet." in text


def test_hostile_class_candidate_and_photo_names_are_escaped() -> None:
    args = inputs((HOSTILE, "laptop"), winner=HOSTILE, photo_id=HOSTILE)
    page = render_report(*args)
    assert "<script" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page
    text = visible(page)
    assert f"Winner: {HOSTILE}, chosen" in text
    assert f"1 {HOSTILE} 0.6000" in text  # candidates table
    assert f"{HOSTILE} true laptop predicted {HOSTILE}" in text  # mistake card
    matrix = confusion_section(args[2], args[5])
    assert "<script" not in matrix and "&lt;script&gt;" in matrix


def test_a_variable_the_page_lacks_is_an_error() -> None:
    template = pages.template(report_module.TEMPLATE)
    args = inputs(("phone", "laptop"))
    page = evaluation_page(*args)
    assert template.render(page=page) == render_report(*args)
    del page["calibration"]["verdict"]
    with pytest.raises(jinja2.UndefinedError, match="verdict"):
        template.render(page=page)
    with pytest.raises(jinja2.UndefinedError):
        template.render()


def test_the_off_category_photos_have_their_own_table_only_with_an_other_class() -> None:
    args = inputs(("phone", "laptop", "other"))
    assert "none of the categories" not in visible(render_report(*args))

    def split(off: int, caught: int, held: int, known: int, wrong: int) -> dict[str, Any]:
        return {
            "off_category_photos": off,
            "answered_other": caught,
            "abstained": held,
            "open_set_recall": (caught + held) / off,
            "known_photos": known,
            "known_called_other": wrong,
            "known_called_other_rate": wrong / known,
        }

    args[0]["open_set"] = {
        "other_class": "other",
        "val": split(20, 8, 2, 100, 3),
        "test": split(10, 4, 0, 50, 1),
    }
    text = visible(render_report(*args))
    assert "Photos that are none of the categories" in text
    assert "val 20 8 2 0.5000 100 3 0.0300" in text and "test 10 4 0 0.4000 50 1 0.0200" in text
