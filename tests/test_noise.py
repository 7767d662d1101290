import numpy as np

from vitrine.curation.noise import (
    class_outlier_scores,
    find_label_issues,
    fit_sample,
    out_of_fold_proba,
)


def blobs(n_per_class: int = 60, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two well-separated classes of unit vectors."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:2] * 6
    x = np.concatenate([rng.normal(size=(n_per_class, dim)) + c for c in centres])
    y = np.repeat([0, 1], n_per_class)
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


def test_flipped_labels_are_found_and_the_true_class_suggested() -> None:
    x, y = blobs()
    given = y.copy()
    flipped = [3, 10, 70, 99]
    given[flipped] = 1 - given[flipped]
    proba = out_of_fold_proba(x, given, n_classes=2, folds=5, seed=0)
    issues = find_label_issues(proba, given)
    found = set(np.flatnonzero(issues.is_issue))
    # Confident learning is conservative: most flips found, and hardly anything else.
    assert len(found & set(flipped)) >= 3 and len(found - set(flipped)) <= 1
    assert (issues.suggested[sorted(found & set(flipped))] == y[sorted(found & set(flipped))]).all()
    # ranked by score, the flipped photos come first
    assert set(np.argsort(-issues.score)[: len(flipped)]) == set(flipped)


def test_clean_labels_give_almost_no_issues() -> None:
    x, y = blobs(seed=1)
    issues = find_label_issues(out_of_fold_proba(x, y, 2, 5, 0), y)
    assert issues.is_issue.sum() <= 2


def test_confident_joint_by_hand() -> None:
    proba = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
    labels = np.array([0, 0, 1, 1])
    # Per-class thresholds of the confident joint, the mean probability of a class over the
    # photos labelled with it: class 0 = (0.9 + 0.7) / 2 = 0.8, class 1 = (0.8 + 0.4) / 2 = 0.6.
    # Photo 3 is labelled 1 and leans to 0, but 0.6 is below class 0's threshold: no issue.
    issues = find_label_issues(proba, labels)
    assert issues.is_issue.tolist() == [False, False, False, False]
    assert issues.suggested.tolist() == labels.tolist()
    proba[3] = [0.85, 0.15]  # now above class 0's threshold while labelled 1
    issues = find_label_issues(proba, labels)
    assert issues.is_issue.tolist() == [False, False, False, True]
    assert issues.suggested.tolist() == [0, 0, 1, 0]


def test_score_is_one_minus_the_probability_of_the_given_class() -> None:
    rng = np.random.default_rng(3)
    proba = rng.dirichlet(np.ones(3), size=50)
    labels = rng.integers(0, 3, 50)
    issues = find_label_issues(proba, labels)
    assert np.allclose(issues.score, 1.0 - proba[np.arange(50), labels])
    # a photo is suggested another class only when it is flagged
    assert (issues.suggested[~issues.is_issue] == labels[~issues.is_issue]).all()


def test_an_off_category_photo_is_an_outlier_of_its_class() -> None:
    x, y = blobs(seed=2)
    x[5] = -x[5]  # points away from every class
    scores = class_outlier_scores(x, y)
    assert scores.argmax() == 5 and scores[5] > 3


def test_a_bounded_fit_is_the_plain_k_fold_up_to_its_size_and_still_finds_flips_above() -> None:
    x, y = blobs(n_per_class=300, seed=4)
    given = y.copy()
    flipped = [3, 50, 310, 555]
    given[flipped] = 1 - given[flipped]
    plain = out_of_fold_proba(x, given, 2, 5, 0)
    np.testing.assert_array_equal(out_of_fold_proba(x, given, 2, 5, 0, max_fit=600), plain)
    bounded = out_of_fold_proba(x, given, 2, 5, 0, max_fit=200)
    assert not np.array_equal(bounded, plain)
    np.testing.assert_allclose(bounded.sum(axis=1), 1.0)  # every photo predicted, once
    issues = find_label_issues(bounded, given)
    found = set(np.flatnonzero(issues.is_issue))
    assert len(found) >= 2 and found <= set(flipped)  # as conservative as the plain k-fold
    assert set(np.argsort(-issues.score)[: len(flipped)]) == set(flipped)


def test_the_fit_sample_is_stratified_and_keeps_a_rare_class_whole() -> None:
    labels = np.repeat([0, 1, 2], [5000, 3000, 30])
    sample = fit_sample(labels, 1000, seed=0)
    counts = np.bincount(labels[sample])
    assert counts.tolist() == [623, 374, 30]  # in proportion; the 30 all kept (< 50)
    assert np.array_equal(sample, np.unique(sample))
    np.testing.assert_array_equal(fit_sample(labels, 1000, seed=0), sample)  # deterministic
    assert len(fit_sample(labels, 0, seed=0)) == len(labels)
