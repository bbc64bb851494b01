"""worker state: whether an inference process is idle or busy

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 18:00:00.000000

Every inference process heartbeats while idle too; ``workers.state`` says which it is
(``idle``/``busy``), so operators can tell an idle worker from a dead one. Trainers leave it
empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("state", sa.String(length=8), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("state")
