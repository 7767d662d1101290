"""Moderators' decisions on recorded answers: the `reviews` table beside `answers`.

One row per decision, never updated: a later decision on the same answer supersedes the earlier
ones for every reader (`latest`), and the history stays (`history`), so who changed which label
when can always be told. Created by the Alembic migration 0002.

  review_id     integer       primary key, increasing: among decisions on one answer, the
                              highest is the one that stands
  request_id    varchar(32)   the answer reviewed (answers.request_id)
  label         varchar(200)  the class the moderator says the photo shows
  reviewer      varchar(200)  who decided (as the review API was told)
  reviewed_at   timestamp     when, UTC
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from vitrine.production.records import RecordStore, answers, metadata

reviews = sa.Table(
    "reviews",
    metadata,
    sa.Column("review_id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(32), sa.ForeignKey("answers.request_id"), nullable=False),
    sa.Column("label", sa.String(200), nullable=False),
    sa.Column("reviewer", sa.String(200), nullable=False),
    sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_reviews_request_id", "request_id", "review_id"),
    sa.Index("ix_reviews_reviewed_at", "reviewed_at"),
)


class UnknownAnswer(KeyError):
    """No recorded answer has this request_id."""


@dataclass(frozen=True, slots=True)
class Review:
    review_id: int
    request_id: str
    label: str
    reviewer: str
    reviewed_at: datetime  # timezone-aware, UTC

    @classmethod
    def from_row(cls, row: sa.Row[Any]) -> Review:
        data = dict(row._mapping)
        at = data["reviewed_at"]
        data["reviewed_at"] = at if at.tzinfo else at.replace(tzinfo=UTC)  # SQLite: no zone
        return cls(**data)


def add_review(store: RecordStore, request_id: str, label: str, reviewer: str) -> Review:
    """Record a decision on an answer; UnknownAnswer if no answer has that request_id. The
    label is not checked here: which classes exist is the caller's knowledge."""
    now = datetime.now(UTC)
    with store.engine.begin() as connection:
        known = connection.execute(
            sa.select(answers.c.request_id).where(answers.c.request_id == request_id)
        ).first()
        if known is None:
            raise UnknownAnswer(request_id)
        review_id = connection.execute(
            sa.insert(reviews)
            .values(request_id=request_id, label=label, reviewer=reviewer, reviewed_at=now)
            .returning(reviews.c.review_id)
        ).scalar_one()
    return Review(review_id, request_id, label, reviewer, now)


def history(store: RecordStore, request_id: str) -> list[Review]:
    """Every decision on one answer, oldest first."""
    query = sa.select(reviews).where(reviews.c.request_id == request_id)
    with store.engine.connect() as connection:
        return [Review.from_row(r) for r in connection.execute(query.order_by(reviews.c.review_id))]


def latest(
    store: RecordStore, request_ids: Iterable[str] | None = None, since: datetime | None = None
) -> dict[str, Review]:
    """The decision that stands for each reviewed answer (its latest), by request_id; only
    these answers' if request_ids is given, only answers reviewed at or after `since` if given
    (their latest decision, whenever it was made)."""
    newest = sa.select(sa.func.max(reviews.c.review_id).label("review_id")).group_by(
        reviews.c.request_id
    )
    if request_ids is not None:
        newest = newest.where(reviews.c.request_id.in_(list(request_ids)))
    if since is not None:
        newest = newest.having(sa.func.max(reviews.c.reviewed_at) >= since)
    query = sa.select(reviews).where(reviews.c.review_id.in_(newest.scalar_subquery()))
    with store.engine.connect() as connection:
        return {r.request_id: r for r in map(Review.from_row, connection.execute(query))}
