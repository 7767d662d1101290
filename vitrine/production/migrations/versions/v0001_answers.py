"""The answers table: one row per served answer (vitrine.production.records).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "answers",
        sa.Column("request_id", sa.String(32), primary_key=True),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("endpoint", sa.String(32), nullable=False),
        sa.Column("model_version", sa.String(200), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column(
            "probabilities",
            sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
            nullable=False,
        ),
        sa.Column("abstain", sa.Boolean(), nullable=False),
        sa.Column("declared_category", sa.String(200), nullable=True),
        sa.Column("matches", sa.Boolean(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("batch_id", sa.String(32), nullable=True),
        sa.Column("client_request_id", sa.String(128), nullable=True),
    )
    op.create_index("ix_answers_answered_at", "answers", ["answered_at"])
    op.create_index("ix_answers_abstain", "answers", ["abstain", "answered_at"])
    op.create_index("ix_answers_matches", "answers", ["matches", "answered_at"])
    op.create_index("ix_answers_model_version", "answers", ["model_version", "answered_at"])
    op.create_index("ix_answers_image_sha256", "answers", ["image_sha256"])


def downgrade() -> None:
    op.drop_table("answers")
