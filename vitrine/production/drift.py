"""Drift: recorded answers in a time window against the evaluated test set.

The window's figures come from the answers database through GROUP BY queries (`summarize`,
`reviewed`, `photo_sample`): the database counts and sums, and Python receives one row per
(hour, label, confidence bin), never one per answer, so a million answers take seconds. The
probabilities JSON is not read. The test set's figures come from evaluate's predictions table
(`baseline`), binned the same way.

The statistics are pure functions of those figures: the population stability index and a
chi-square test of the class mix, a kernel two-sample test (MMD with a permutation p-value) of
photo embeddings, and `judge`, which compares every figure with its threshold. A figure drawn
from too few answers, reviews or photos is reported but not judged: noise must not retrain.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from scipy import stats

from vitrine.config import NonNegative, Share, params_block
from vitrine.production.records import RecordStore, answers
from vitrine.production.reviews import reviews

HOUR_FORMAT = "%Y-%m-%d %H:00"  # an hour's key, UTC, as both databases format it
PSI_FLOOR = 1e-4  # a share of 0 counts as this in the PSI, which is infinite otherwise


@params_block
class Thresholds:
    """params.yaml `monitor.thresholds:`: a figure past its threshold is drift."""

    psi: NonNegative  # class mix, population stability index over the answered classes: above
    chi2_p_value: Share  # class mix, chi-square test of recent against test counts: below
    mmd_p_value: Share  # photo embeddings, MMD permutation test: below
    confidence_drop: Share  # mean confidence below the test set's by more than this
    abstain_rate: Share  # share of answers abstained (sent to review): above
    mismatch_rate: Share  # /check_category answers whose label is not the declared one: above
    reviewed_accuracy: Share  # the model's answers that reviews confirmed, among reviewed: below


@dataclass(frozen=True)
class AnswerSummary:
    """The recorded answers of one window, as counts and sums."""

    answers: int = 0
    by_label: dict[str, int] = field(default_factory=dict)
    by_hour: dict[str, int] = field(default_factory=dict)  # HOUR_FORMAT key -> answers
    by_model_version: dict[str, int] = field(default_factory=dict)
    by_endpoint: dict[str, int] = field(default_factory=dict)
    confidence_sum: float = 0.0
    confidence_histogram: tuple[int, ...] = ()  # equal bins over [0, 1]
    abstained: int = 0
    checked: int = 0  # answers with a declared category (/check_category)
    mismatched: int = 0  # of those, the label differing from the declared category

    @property
    def mean_confidence(self) -> float | None:
        return self.confidence_sum / self.answers if self.answers else None

    @property
    def abstain_rate(self) -> float | None:
        return self.abstained / self.answers if self.answers else None

    @property
    def mismatch_rate(self) -> float | None:
        return self.mismatched / self.checked if self.checked else None

    def by_day(self) -> dict[str, int]:
        days: Counter[str] = Counter()
        for hour, n in self.by_hour.items():
            days[hour[:10]] += n
        return dict(sorted(days.items()))


@dataclass(frozen=True)
class ReviewedSummary:
    """Reviewed answers of a window: the model's label against the standing review's."""

    pairs: dict[tuple[str, str], int] = field(default_factory=dict)  # (answered, reviewed) -> n

    @property
    def reviewed(self) -> int:
        return sum(self.pairs.values())

    @property
    def correct(self) -> int:
        return sum(n for (answered, label), n in self.pairs.items() if answered == label)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.reviewed if self.reviewed else None


@dataclass(frozen=True)
class Baseline:
    """The evaluated test set: the winner's answers on the test photos."""

    photos: int
    by_label: dict[str, int]  # answered (predicted) classes
    confidence_histogram: tuple[int, ...]
    mean_confidence: float
    abstain_rate: float
    accuracy: float


@dataclass(frozen=True)
class MMDResult:
    """A kernel two-sample test: Gaussian kernel, median-distance bandwidth."""

    mmd2: float  # unbiased squared maximum mean discrepancy
    p_value: float  # share of label permutations with an MMD at least as large (+1 smoothing)
    bandwidth: float  # the kernel's squared length scale: the pooled median squared distance
    n_recent: int
    n_test: int
    permutations: int


@dataclass(frozen=True)
class Check:
    """One threshold: the figure, the rule and whether it was crossed."""

    name: str
    value: float | None
    threshold: float
    rule: str  # "above" or "below": crossing is being above (below) the threshold
    judged: bool  # False when the figure is missing or rests on too few observations
    crossed: bool
    note: str = ""


def has_table(store: RecordStore, name: str) -> bool:
    """Whether the database has this table (a database the service never started has none)."""
    return sa.inspect(store.engine).has_table(name)


def _window(since: datetime, until: datetime) -> sa.ColumnElement[bool]:
    # UTC: SQLite keeps the times as UTC text, compared as text.
    since, until = since.astimezone(UTC), until.astimezone(UTC)
    return sa.and_(answers.c.answered_at >= since, answers.c.answered_at < until)


def _hour(backend: str) -> sa.ColumnElement[str]:
    """The answer's hour as text, UTC: the same key from either database."""
    if backend == "postgresql":
        at_utc = sa.func.timezone("UTC", answers.c.answered_at)
        return sa.func.to_char(at_utc, "YYYY-MM-DD HH24:00")
    return sa.func.strftime(HOUR_FORMAT, answers.c.answered_at)  # SQLite stores UTC


def _bin(backend: str, bins: int) -> sa.ColumnElement[int]:
    """floor(confidence * bins): PostgreSQL's cast rounds, SQLite's truncates (confidence >= 0)."""
    scaled = answers.c.confidence * bins
    if backend == "postgresql":
        return sa.cast(sa.func.floor(scaled), sa.Integer)
    return sa.cast(scaled, sa.Integer)


def confidence_bin(confidence: np.ndarray, bins: int) -> np.ndarray:
    """The bin of each confidence, as the SQL summary computes it (1.0 in the last bin)."""
    return np.clip(np.floor(np.asarray(confidence, dtype=np.float64) * bins), 0, bins - 1).astype(
        np.int64
    )


def summarize(store: RecordStore, since: datetime, until: datetime, bins: int) -> AnswerSummary:
    """The answers in [since, until), counted in the database: two GROUP BY scans."""
    if not has_table(store, "answers"):
        return AnswerSummary(confidence_histogram=(0,) * bins)
    when = _window(since, until)
    hour, bin_ = _hour(store.backend).label("hour"), _bin(store.backend, bins).label("bin")
    per_group = (
        sa.select(
            hour,
            answers.c.label,
            bin_,
            sa.func.count().label("n"),
            sa.func.sum(answers.c.confidence).label("confidence"),
            sa.func.sum(sa.case((answers.c.abstain, 1), else_=0)).label("abstained"),
            sa.func.count(answers.c.declared_category).label("checked"),
            sa.func.sum(sa.case((sa.not_(answers.c.matches), 1), else_=0)).label("mismatched"),
        )
        .where(when)
        .group_by(hour, answers.c.label, bin_)
    )
    per_source = (
        sa.select(answers.c.model_version, answers.c.endpoint, sa.func.count().label("n"))
        .where(when)
        .group_by(answers.c.model_version, answers.c.endpoint)
    )
    labels: Counter[str] = Counter()
    hours: Counter[str] = Counter()
    histogram = [0] * bins
    totals = {"confidence": 0.0, "abstained": 0, "checked": 0, "mismatched": 0}
    with store.engine.connect() as connection:
        for row in connection.execute(per_group):
            labels[row.label] += row.n
            hours[row.hour] += row.n
            histogram[min(max(int(row.bin), 0), bins - 1)] += row.n
            totals["confidence"] += float(row.confidence)
            for key in ("abstained", "checked", "mismatched"):
                totals[key] += int(row._mapping[key] or 0)
        versions: Counter[str] = Counter()
        endpoints: Counter[str] = Counter()
        for row in connection.execute(per_source):
            versions[row.model_version] += row.n
            endpoints[row.endpoint] += row.n
    return AnswerSummary(
        answers=sum(labels.values()),
        by_label=dict(sorted(labels.items())),
        by_hour=dict(sorted(hours.items())),
        by_model_version=dict(sorted(versions.items())),
        by_endpoint=dict(sorted(endpoints.items())),
        confidence_sum=float(totals["confidence"]),
        confidence_histogram=tuple(histogram),
        abstained=int(totals["abstained"]),
        checked=int(totals["checked"]),
        mismatched=int(totals["mismatched"]),
    )


def count_answers(store: RecordStore, since: datetime, until: datetime) -> int:
    if not has_table(store, "answers"):
        return 0
    query = sa.select(sa.func.count()).select_from(answers).where(_window(since, until))
    with store.engine.connect() as connection:
        return int(connection.execute(query).scalar_one())


def reviewed(store: RecordStore, since: datetime, until: datetime) -> ReviewedSummary:
    """Answers of the window with a standing review (the latest decision on each), counted by
    (answered label, reviewed label)."""
    if not (has_table(store, "answers") and has_table(store, "reviews")):
        return ReviewedSummary()
    standing = (
        sa.select(sa.func.max(reviews.c.review_id)).group_by(reviews.c.request_id).scalar_subquery()
    )
    query = (
        sa.select(answers.c.label, reviews.c.label.label("reviewed"), sa.func.count().label("n"))
        .select_from(answers.join(reviews, reviews.c.request_id == answers.c.request_id))
        .where(_window(since, until), reviews.c.review_id.in_(standing))
        .group_by(answers.c.label, reviews.c.label)
    )
    with store.engine.connect() as connection:
        pairs = {(r.label, r.reviewed): int(r.n) for r in connection.execute(query)}
    return ReviewedSummary(dict(sorted(pairs.items())))


def photo_sample(store: RecordStore, since: datetime, until: datetime, limit: int) -> list[str]:
    """Up to `limit` distinct photos (SHA-256) answered in the window: the lowest hashes, which,
    hashes being uniform, are a random sample that a rerun draws again."""
    if limit <= 0 or not has_table(store, "answers"):
        return []
    query = (
        sa.select(answers.c.image_sha256)
        .where(_window(since, until))
        .group_by(answers.c.image_sha256)
        .order_by(answers.c.image_sha256)
        .limit(limit)
    )
    with store.engine.connect() as connection:
        return list(connection.execute(query).scalars())


def baseline(predictions: pd.DataFrame, bins: int) -> Baseline:
    """The test set's figures from evaluate's predictions table (label, predicted, answer,
    confidence, abstained per photo). The class mix counts what the service answers, as the
    answers table does: the taxonomy node a photo was answered at (`answer`), which is the
    predicted class unless the answer backed off to an ancestor."""
    confidence = predictions["confidence"].to_numpy(dtype=np.float64)
    histogram = np.bincount(confidence_bin(confidence, bins), minlength=bins)
    answered = "answer" if "answer" in predictions else "predicted"
    counts = predictions[answered].astype(str).value_counts()
    n = len(predictions)
    right = (predictions["label"] == predictions["predicted"]).to_numpy()
    return Baseline(
        photos=n,
        by_label={str(k): int(v) for k, v in sorted(counts.items())},
        confidence_histogram=tuple(int(x) for x in histogram),
        mean_confidence=float(confidence.mean()) if n else math.nan,
        abstain_rate=float(predictions["abstained"].mean()) if n else math.nan,
        accuracy=float(right.mean()) if n else math.nan,
    )


def shares(counts: Mapping[str, int], keys: Sequence[str]) -> list[float]:
    total = sum(counts.values())
    return [counts.get(k, 0) / total if total else 0.0 for k in keys]


def psi(expected: Mapping[str, int], actual: Mapping[str, int]) -> float | None:
    """Population stability index of `actual`'s shares against `expected`'s, over the keys of
    both: sum((a - e) * ln(a / e)); under 0.1 is stable by the usual reading, over 0.2 a shift.
    None when either side is empty."""
    if not sum(expected.values()) or not sum(actual.values()):
        return None
    keys = sorted(set(expected) | set(actual))
    e = np.maximum(shares(expected, keys), PSI_FLOOR)
    a = np.maximum(shares(actual, keys), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def histogram_counts(histogram: Sequence[int]) -> dict[str, int]:
    """A histogram as counts by bin, for psi."""
    return {f"{i:03d}": int(n) for i, n in enumerate(histogram)}


def chi_square(
    expected: Mapping[str, int], actual: Mapping[str, int]
) -> tuple[float, float] | None:
    """Chi-square test of homogeneity of two count tables (statistic, p-value); None when
    either is empty. Classes neither side answered are left out."""
    if not sum(expected.values()) or not sum(actual.values()):
        return None
    keys = sorted(k for k in set(expected) | set(actual) if expected.get(k, 0) + actual.get(k, 0))
    if len(keys) < 2:
        return 0.0, 1.0
    table = np.array([[expected.get(k, 0) for k in keys], [actual.get(k, 0) for k in keys]])
    result = stats.chi2_contingency(table)
    return float(result.statistic), float(result.pvalue)


def mmd_test(
    recent: np.ndarray, test: np.ndarray, permutations: int, seed: int
) -> MMDResult | None:
    """Do two samples of embeddings come from one distribution? The unbiased MMD² under a
    Gaussian kernel (squared length scale: the median squared distance of the pooled sample),
    its p-value from `permutations` random relabellings of the pooled sample. None with fewer
    than two embeddings on either side."""
    n, m = len(recent), len(test)
    if n < 2 or m < 2:
        return None
    z = np.vstack([recent, test]).astype(np.float64)
    norms = np.einsum("ij,ij->i", z, z)
    squared = np.maximum(norms[:, None] + norms[None, :] - 2 * z @ z.T, 0.0)
    off_diagonal = squared[~np.eye(n + m, dtype=bool)]
    bandwidth = float(np.median(off_diagonal)) or 1.0
    kernel = np.exp(-squared / bandwidth)
    rng = np.random.default_rng(seed)
    # Row 0: the observed split; then permutations. A row marks the "recent" members.
    members = np.zeros((permutations + 1, n + m))
    members[0, :n] = 1
    for row in members[1:]:
        row[rng.permutation(n + m)[:n]] = 1
    statistic = _mmd2(kernel, members, n, m)
    p_value = (1 + int(np.sum(statistic[1:] >= statistic[0]))) / (1 + permutations)
    return MMDResult(float(statistic[0]), p_value, bandwidth, n, m, permutations)


def _mmd2(kernel: np.ndarray, members: np.ndarray, n: int, m: int) -> np.ndarray:
    """The unbiased MMD² of each split (a row of 0/1 membership), K's diagonal being 1."""
    others = 1 - members
    k_members = members @ kernel
    within = np.einsum("pi,pi->p", k_members, members) - n  # sum of K(x, x') over x != x'
    between = np.einsum("pi,pi->p", k_members, others)
    k_others = others @ kernel
    rest = np.einsum("pi,pi->p", k_others, others) - m
    return within / (n * (n - 1)) + rest / (m * (m - 1)) - 2 * between / (n * m)


def _check(
    name: str, value: float | None, threshold: float, rule: str, enough: bool, why_not: str
) -> Check:
    if value is None or not math.isfinite(value):
        return Check(name, None, threshold, rule, False, False, why_not or "no value")
    if not enough:
        return Check(name, value, threshold, rule, False, False, why_not)
    crossed = value > threshold if rule == "above" else value < threshold
    return Check(name, value, threshold, rule, True, crossed)


def judge(
    figures: Mapping[str, Any], thresholds: Thresholds, minimums: Mapping[str, int]
) -> list[Check]:
    """Every threshold against its figure. figures: answers, checked, reviewed, photos (the
    embedded recent photos) and the values psi, chi2_p_value, mmd_p_value, confidence_drop,
    abstain_rate, mismatch_rate, reviewed_accuracy (None when unknown)."""
    answers_ok = figures["answers"] >= minimums["answers"]
    too_few = f"fewer than {minimums['answers']} answers in the window"
    rules: list[tuple[str, str, bool, str]] = [
        ("psi", "above", answers_ok, too_few),
        ("chi2_p_value", "below", answers_ok, too_few),
        (
            "mmd_p_value",
            "below",
            figures["photos"] >= minimums["photos"],
            f"fewer than {minimums['photos']} recent photos embedded",
        ),
        ("confidence_drop", "above", answers_ok, too_few),
        ("abstain_rate", "above", answers_ok, too_few),
        (
            "mismatch_rate",
            "above",
            figures["checked"] >= minimums["answers"],
            f"fewer than {minimums['answers']} /check_category answers in the window",
        ),
        (
            "reviewed_accuracy",
            "below",
            figures["reviewed"] >= minimums["reviewed"],
            f"fewer than {minimums['reviewed']} reviewed answers in the window",
        ),
    ]
    limits = {
        "psi": thresholds.psi,
        "chi2_p_value": thresholds.chi2_p_value,
        "mmd_p_value": thresholds.mmd_p_value,
        "confidence_drop": thresholds.confidence_drop,
        "abstain_rate": thresholds.abstain_rate,
        "mismatch_rate": thresholds.mismatch_rate,
        "reviewed_accuracy": thresholds.reviewed_accuracy,
    }
    return [
        _check(name, figures.get(name), limits[name], rule, enough, why)
        for name, rule, enough, why in rules
    ]


def hour_start(key: str) -> datetime:
    """An hour's key back to its start, UTC."""
    return datetime.strptime(key, HOUR_FORMAT).replace(tzinfo=UTC)


def hourly_series(summary: AnswerSummary, since: datetime, until: datetime) -> list[int]:
    """Answers per hour from since's hour to until's, zeros included (the volume plot)."""
    first = since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    hours = max(1, math.ceil((until - first).total_seconds() / 3600))
    series: defaultdict[int, int] = defaultdict(int)
    for key, n in summary.by_hour.items():
        index = int((hour_start(key) - first).total_seconds() // 3600)
        if 0 <= index < hours:
            series[index] += n
    return [series[i] for i in range(hours)]
