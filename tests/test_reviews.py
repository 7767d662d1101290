"""Moderators' decisions on recorded answers (vitrine.production.reviews), on SQLite and on a
real PostgreSQL server: a later decision supersedes, the history stays, unknown answers are
refused."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from tests.helpers.records import sample_answer
from vitrine.production.records import RecordStore
from vitrine.production.reviews import UnknownAnswer, add_review, history, latest


def test_a_later_decision_supersedes_and_the_history_stays(store: RecordStore) -> None:
    a, b = sample_answer(1), sample_answer(7)
    store.insert([a, b])
    first = add_review(store, a.request_id, "phone", "ana")
    time.sleep(0.01)
    second = add_review(store, a.request_id, "laptop", "boris")
    add_review(store, b.request_id, "phone", "ana")
    assert second.review_id > first.review_id
    assert [(r.label, r.reviewer) for r in history(store, a.request_id)] == [
        ("phone", "ana"),
        ("laptop", "boris"),
    ]
    standing = latest(store)
    assert {k: v.label for k, v in standing.items()} == {
        a.request_id: "laptop",
        b.request_id: "phone",
    }
    assert set(latest(store, [b.request_id])) == {b.request_id}
    assert set(latest(store, since=second.reviewed_at)) == {a.request_id, b.request_id}
    assert latest(store, since=datetime.now(UTC).replace(year=2100)) == {}
    assert standing[a.request_id].reviewed_at.tzinfo is not None


def test_a_decision_on_an_unknown_answer_is_refused(store: RecordStore) -> None:
    with pytest.raises(UnknownAnswer):
        add_review(store, "0" * 32, "phone", "ana")
    assert latest(store) == {}
