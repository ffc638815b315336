"""index for the fair scheduler: a batch's chunks by state and index

Revision ID: 0006_sched
Revises: 0001
"""

from alembic import op

revision = "0006_sched"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_chunks_batch_state", "chunks", ["batch_id", "state", "idx"])


def downgrade() -> None:
    op.drop_index("ix_chunks_batch_state", table_name="chunks")
