"""Drift figures and statistics (vitrine.production.drift) and the monitor page: the SQL summary
against pandas on the same rows, on SQLite and PostgreSQL; the tests flag shifted class mixes
and embeddings and leave identical distributions alone; the page renders its plots."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest

from benchmarks.monitor import main as benchmark
from tests.helpers.html import HOSTILE, Text
from tests.helpers.records import sample_answer
from vitrine.production import drift
from vitrine.production.drift_page import render_page
from vitrine.production.records import AnswerRecord, RecordStore
from vitrine.production.reviews import add_review

UNTIL = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
SINCE = UNTIL - timedelta(hours=6)
BINS = 10


def varied_answers() -> list[AnswerRecord]:
    """Answers spread over 8 hours (some before the window, one at its very end), with every
    kind of row: abstained, checked (matching or not), two model versions, three endpoints."""
    records = []
    for i in range(90):
        at = UNTIL - timedelta(minutes=5 * i + 1)
        extra: dict[str, Any] = {"model_version": "v2" if i % 4 == 0 else "v1"}
        if i % 7 == 0:
            extra["endpoint"] = "/classify_batch"
        declared = ("phone", "laptop", None)[i % 3] if i % 5 else "laptop"
        answer = sample_answer(i, at=at, abstain=i % 3 == 0, declared=declared)
        records.append(dataclasses.replace(answer, **extra))
    records.append(sample_answer(5, at=UNTIL))  # the window is [since, until): left out
    records.append(sample_answer(6, at=SINCE))  # ... and this one is in
    return records


def expected_summary(records: list[AnswerRecord]) -> dict[str, Any]:
    """The same figures from every row, with pandas."""
    df = pd.DataFrame([r.row() for r in records])
    df = df[(df["answered_at"] >= SINCE) & (df["answered_at"] < UNTIL)]
    hours = df["answered_at"].dt.floor("h").dt.strftime(drift.HOUR_FORMAT)
    bins = np.minimum(np.floor(df["confidence"] * BINS), BINS - 1).astype(int)
    return {
        "answers": len(df),
        "by_label": df["label"].value_counts().sort_index().to_dict(),
        "by_hour": hours.value_counts().sort_index().to_dict(),
        "by_model_version": df["model_version"].value_counts().sort_index().to_dict(),
        "by_endpoint": df["endpoint"].value_counts().sort_index().to_dict(),
        "confidence_sum": pytest.approx(df["confidence"].sum()),
        "confidence_histogram": tuple(np.bincount(bins, minlength=BINS).tolist()),
        "abstained": int(df["abstain"].sum()),
        "checked": int(df["declared_category"].notna().sum()),
        "mismatched": int(df["matches"].eq(False).sum()),  # NULL (not checked): no mismatch
    }


def test_the_sql_summary_matches_pandas_on_the_same_rows(store: RecordStore) -> None:
    records = varied_answers()
    store.insert(records)

    summary = drift.summarize(store, SINCE, UNTIL, BINS)

    want = expected_summary(records)
    assert dataclasses.asdict(summary) == want
    assert 0 < summary.mismatched < summary.checked < summary.answers < len(records)
    assert summary.mean_confidence == pytest.approx(summary.confidence_sum / summary.answers)
    assert sum(summary.by_day().values()) == summary.answers
    assert drift.count_answers(store, SINCE, UNTIL) == summary.answers
    assert drift.hourly_series(summary, SINCE, UNTIL) == list(want["by_hour"].values())


def test_a_window_in_another_time_zone_is_the_same_window(store: RecordStore) -> None:
    store.insert(varied_answers())
    moscow = UNTIL.astimezone(datetime.fromisoformat("2026-01-01T00:00+03:00").tzinfo)
    shifted = drift.summarize(store, moscow - timedelta(hours=6), moscow, BINS)
    assert shifted == drift.summarize(store, SINCE, UNTIL, BINS)


def test_reviewed_answers_count_their_standing_review_only(store: RecordStore) -> None:
    inside = [sample_answer(i, at=UNTIL - timedelta(hours=1)) for i in (1, 2, 7, 8)]
    outside = sample_answer(9, at=UNTIL - timedelta(hours=7))
    store.insert([*inside, outside])
    add_review(store, inside[0].request_id, "phone", "ana")  # answered laptop: superseded...
    add_review(store, inside[0].request_id, "laptop", "boris")  # ... by a confirmation
    add_review(store, inside[1].request_id, "phone", "ana")  # laptop answered, phone shown
    add_review(store, inside[2].request_id, "phone", "ana")  # phone, confirmed
    add_review(store, outside.request_id, "laptop", "ana")  # outside the window

    reviewed = drift.reviewed(store, SINCE, UNTIL)

    assert reviewed.pairs == {
        ("laptop", "laptop"): 1,
        ("laptop", "phone"): 1,
        ("phone", "phone"): 1,
    }
    assert (reviewed.reviewed, reviewed.correct) == (3, 2)
    assert reviewed.accuracy == pytest.approx(2 / 3)


def test_the_photo_sample_is_distinct_photos_of_the_window(store: RecordStore) -> None:
    same = [sample_answer(3, at=UNTIL - timedelta(hours=h)) for h in (1, 2, 3)]
    store.insert([*same, *(sample_answer(i, at=UNTIL - timedelta(hours=2)) for i in range(10))])
    store.insert([sample_answer(50, at=UNTIL - timedelta(hours=9))])

    photos = drift.photo_sample(store, SINCE, UNTIL, 100)

    assert len(photos) == len(set(photos)) == 10  # sample_answer(3) twice: one photo
    assert photos == sorted(photos)
    assert drift.photo_sample(store, SINCE, UNTIL, 4) == photos[:4]


def test_a_database_without_tables_is_an_empty_window(tmp_path: Any) -> None:
    store = RecordStore(f"sqlite:///{tmp_path / 'never-migrated.sqlite'}")
    summary = drift.summarize(store, SINCE, UNTIL, BINS)
    assert (summary.answers, summary.mean_confidence, summary.abstain_rate) == (0, None, None)
    assert summary.confidence_histogram == (0,) * BINS
    assert drift.reviewed(store, SINCE, UNTIL).accuracy is None
    assert drift.photo_sample(store, SINCE, UNTIL, 10) == []
    assert drift.count_answers(store, SINCE, UNTIL) == 0


def test_the_baseline_bins_test_confidences_as_the_sql_does() -> None:
    predictions = pd.DataFrame(
        {
            "label": ["phone", "phone", "laptop", "laptop"],
            "predicted": ["phone", "laptop", "laptop", "laptop"],
            "confidence": [1.0, 0.55, 0.7, 0.05],
            "abstained": [False, True, False, False],
        }
    )
    base = drift.baseline(predictions, BINS)
    assert base.by_label == {"laptop": 3, "phone": 1}
    assert base.confidence_histogram == (1, 0, 0, 0, 0, 1, 0, 1, 0, 1)
    assert (base.accuracy, base.abstain_rate, base.photos) == (0.75, 0.25, 4)


def test_the_class_mix_statistics_flag_a_shift_not_the_same_mix() -> None:
    rng = np.random.default_rng(0)
    classes = ["laptop", "phone", "tablet"]

    def draw(p: list[float], n: int) -> dict[str, int]:
        counts = rng.multinomial(n, p)
        return {c: int(k) for c, k in zip(classes, counts, strict=True)}

    test = draw([0.4, 0.5, 0.1], 500)
    same = draw([0.4, 0.5, 0.1], 5000)
    shifted = draw([0.15, 0.5, 0.35], 5000)

    assert drift.psi(test, same) < 0.02
    assert drift.psi(test, shifted) > 0.2
    assert drift.chi_square(test, same)[1] > 0.05
    assert drift.chi_square(test, shifted)[1] < 1e-6
    # A class the test set never answered counts, without an infinite PSI.
    assert 0.2 < drift.psi(test, {**same, "camera": 2000}) < 10
    assert drift.psi(test, {}) is None and drift.chi_square({}, same) is None


def test_the_mmd_test_flags_shifted_embeddings_not_identical_ones() -> None:
    rng = np.random.default_rng(1)
    dim = 16
    test = rng.normal(size=(80, dim))
    same = rng.normal(size=(80, dim))
    shifted = rng.normal(size=(80, dim)) + np.r_[0.8, np.zeros(dim - 1)]

    alike = drift.mmd_test(same, test, permutations=200, seed=0)
    apart = drift.mmd_test(shifted, test, permutations=200, seed=0)

    assert alike is not None and apart is not None
    assert alike.p_value > 0.05
    assert apart.p_value < 0.01 and apart.mmd2 > alike.mmd2
    assert apart.p_value >= 1 / 201  # never 0: the observed split counts among the permutations
    assert drift.mmd_test(same[:1], test, permutations=10, seed=0) is None
    assert drift.mmd_test(same, test, 200, 0) == alike  # seeded


THRESHOLDS = drift.Thresholds(
    psi=0.2,
    chi2_p_value=0.001,
    mmd_p_value=0.01,
    confidence_drop=0.05,
    abstain_rate=0.25,
    mismatch_rate=0.2,
    reviewed_accuracy=0.8,
)
MINIMUMS = {"answers": 100, "photos": 20, "reviewed": 10}


def figures(**changes: Any) -> dict[str, Any]:
    calm = {
        "answers": 1000,
        "checked": 300,
        "reviewed": 50,
        "photos": 100,
        "psi": 0.01,
        "chi2_p_value": 0.4,
        "mmd_p_value": 0.5,
        "confidence_drop": 0.01,
        "abstain_rate": 0.05,
        "mismatch_rate": 0.05,
        "reviewed_accuracy": 0.9,
    }
    return {**calm, **changes}


def test_judge_crosses_a_threshold_only_with_enough_observations() -> None:
    assert [c.name for c in drift.judge(figures(), THRESHOLDS, MINIMUMS) if c.crossed] == []
    shifted = drift.judge(figures(psi=0.5, reviewed_accuracy=0.6), THRESHOLDS, MINIMUMS)
    assert [c.name for c in shifted if c.crossed] == ["psi", "reviewed_accuracy"]

    few_figures = figures(answers=50, psi=0.5, reviewed=3, reviewed_accuracy=0.1)
    few = drift.judge(few_figures, THRESHOLDS, MINIMUMS)
    by_name = {c.name: c for c in few}
    assert not any(c.crossed for c in few)
    assert not by_name["psi"].judged and "fewer than 100 answers" in by_name["psi"].note
    assert not by_name["reviewed_accuracy"].judged
    assert by_name["mmd_p_value"].judged  # photos enough
    unknown = {c.name: c for c in drift.judge(figures(mmd_p_value=None), THRESHOLDS, MINIMUMS)}
    assert not unknown["mmd_p_value"].judged and unknown["mmd_p_value"].value is None


def page_report(answers: int) -> dict[str, Any]:
    checks = drift.judge(figures(answers=answers, psi=0.5), THRESHOLDS, MINIMUMS)
    return {
        "window": {
            "since": SINCE.isoformat(),
            "until": UNTIL.isoformat(),
            "hours": 6,
            "first_hour": SINCE.isoformat(),
        },
        "answers": {
            "answers": answers,
            "previous_window_answers": 7,
            "per_hour": [answers // 6] * 6,
            "per_day": {"2026-03-02": answers} if answers else {},
            "by_label": {"laptop": answers},
            "by_model_version": {"v1": answers},
            "by_endpoint": {"/classify": answers},
            "abstained": 0,
        },
        "test": {"photos": 4, "accuracy": 0.75},
        "class_mix": {
            "recent": {"laptop": 0.8, HOSTILE: 0.2} if answers else {},
            "test": {"laptop": 0.5, "phone": 0.5},
            "psi": 0.5,
            "chi2": 3.0,
            "chi2_p_value": 0.08,
        },
        "confidence": {
            "recent_mean": 0.8,
            "test_mean": 0.9,
            "drop": 0.1,
            "recent_histogram": [0.0, 0.2, 0.8],
            "test_histogram": [0.1, 0.1, 0.8],
            "psi": 0.3,
        },
        "abstain": {"recent_rate": 0.1, "test_rate": 0.0},
        "mismatch": {"checked": 0, "mismatched": 0, "rate": None},
        "images": {"embedded": 0, "missing": 3, "p_value": None},
        "reviewed": {
            "reviewed": 2 if answers else 0,
            "accuracy": 0.5 if answers else None,
            "pairs": [["laptop", "phone", 1], ["phone", "phone", 1]] if answers else [],
        },
        "checks": [dataclasses.asdict(c) for c in checks],
        "crossed": [c.name for c in checks if c.crossed],
        "retrain": {"wanted": True, "enabled": True, "started": True},
        "notes": ["3 sampled photos were deleted by retention."],
    }


def test_the_page_shows_its_plots_and_escapes_class_names() -> None:
    page = render_page(page_report(600))
    text = Text()
    text.feed(page)

    for plot in ("class-mix", "confidence", "volume"):
        assert f'id="{plot}"' in page
    assert page.count("<rect") >= 2 * 2 + 3 + 6  # class pairs, bins, hours
    assert '<path d="M' in page  # the test set's confidence line
    assert HOSTILE in text.text and HOSTILE not in page  # shown as text, never as markup
    assert "psi crossed its threshold" in text.text and "retrain flow was started" in text.text
    assert "deleted by retention" in text.text
    assert "2 answers of the window have a standing review" in text.text


def test_the_page_of_an_empty_window_says_so() -> None:
    text = Text()
    text.feed(render_page(page_report(0)))
    assert "No answers in the window." in text.text
    assert "No answer of the window has been reviewed." in text.text


def test_the_benchmark_summarises_every_row_it_inserts(capsys: pytest.CaptureFixture[str]) -> None:
    assert benchmark(["--rows", "3000", "--reviews", "100", "--repeat", "1"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("rows 3000  seconds ") and " rows/s " in last and " cpu " in last


def test_the_baseline_counts_answers_at_the_level_they_were_given() -> None:
    """With a taxonomy, the service records an answer backed off to `Fruit/Apple` under that name:
    the test set's mix counts the same names, so a backed-off answer is no new class."""
    predictions = pd.DataFrame(
        {
            "label": ["Fruit/Apple/Granny", "Fruit/Apple/Golden", "Fruit/Pear/Conference"],
            "predicted": ["Fruit/Apple/Golden", "Fruit/Apple/Golden", "Fruit/Pear/Conference"],
            "answer": ["Fruit/Apple", "Fruit/Apple/Golden", "Fruit/Pear/Conference"],
            "confidence": [0.5, 0.9, 0.95],
            "abstained": [False, False, False],
        }
    )
    base = drift.baseline(predictions, BINS)
    assert base.by_label == {"Fruit/Apple": 1, "Fruit/Apple/Golden": 1, "Fruit/Pear/Conference": 1}
    assert (
        drift.chi_square(
            base.by_label,
            {"Fruit/Apple": 10, "Fruit/Apple/Golden": 10, "Fruit/Pear/Conference": 10},
        )[1]
        > 0.9
    )
