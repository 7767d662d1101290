"""benchmarks/open_set_detectors.py: the recall at a share of known photos flagged, and the
k-NN cosine it ranks by."""

from __future__ import annotations

import numpy as np

from benchmarks.open_set_detectors import fold_scores, kth_cosine, recall_at


def test_recall_counts_off_category_photos_above_the_known_photos_threshold() -> None:
    known = np.arange(100) / 100  # 0.00 ... 0.99
    off = np.array([0.995, 0.985, 0.975, 0.5])
    scores, is_off = np.concatenate([known, off]), np.r_[np.zeros(100, bool), np.ones(4, bool)]
    assert recall_at(scores, is_off, 0.01) == 0.5  # above 0.98, the top 1% of known: two of four
    assert recall_at(scores, is_off, 0.05) == 0.75


def test_kth_cosine_and_the_scores_rank_an_off_category_photo_first() -> None:
    rng = np.random.default_rng(0)
    known, off = np.eye(3)[0], np.eye(3)[1]
    near = [known] * 20 + [off] * 8
    train = np.stack([centre + 0.05 * rng.standard_normal(3) for centre in near])
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    off_train = np.r_[np.zeros(20, bool), np.ones(8, bool)]
    test = np.stack([known, off])
    assert kth_cosine(test, train[~off_train], 5)[0] > 0.99
    for values in fold_scores(train, off_train, test).values():
        assert values[1] > values[0]
