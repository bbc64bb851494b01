"""faces: each job's face policy; each result's faces, how many the detector found, and the
image's size (the frame of the faces' boxes)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 16:00:00.000000

Results stay one row per image (the image id is the key that makes a repeated chunk write
nothing twice); the faces of an image are a JSON list in its row.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


#: The result's faces (a JSON list), how many the detector found, and the image's size.
RESULT_COLUMNS = (
    ("faces", sa.JSON),
    ("faces_found", sa.Integer),
    ("image_width", sa.Integer),
    ("image_height", sa.Integer),
)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("face_policy", sa.String(length=8), nullable=False, server_default="all")
        )
    with op.batch_alter_table("results") as batch:
        for name, column_type in RESULT_COLUMNS:
            batch.add_column(sa.Column(name, column_type(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("results") as batch:
        for name, _ in reversed(RESULT_COLUMNS):
            batch.drop_column(name)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("face_policy")
