"""batch pause (batches.paused_at) and part commit times for the lines/s window

Revision ID: 0005_pause
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_pause"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("paused_at", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("result_parts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("committed_at", sa.Float(), nullable=True))
        batch_op.create_index("ix_result_parts_batch_committed", ["batch_id", "committed_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("result_parts", schema=None) as batch_op:
        batch_op.drop_index("ix_result_parts_batch_committed")
        batch_op.drop_column("committed_at")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_column("paused_at")
