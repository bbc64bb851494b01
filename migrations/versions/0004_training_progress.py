"""training progress and cancellation; worker roles

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 15:00:00.000000

``training_runs.progress`` holds what the trainer last reported (epoch, steps, the latest
validation metrics, an ETA); ``cancel_requested_at`` is how an admin's cancel reaches the trainer
that runs the job. ``workers.role`` tells inference workers from trainers (both heartbeat), and
``workers.data_root`` lets the API notice a trainer that reads another data root than its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("training_runs") as batch:
        batch.add_column(sa.Column("progress", sa.JSON(), nullable=True))
        batch.add_column(
            sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table("workers") as batch:
        batch.add_column(
            sa.Column("role", sa.String(length=16), nullable=False, server_default="inference")
        )
        batch.add_column(sa.Column("data_root", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("data_root")
        batch.drop_column("role")
    with op.batch_alter_table("training_runs") as batch:
        batch.drop_column("cancel_requested_at")
        batch.drop_column("progress")
