"""API keys, projects (quota overrides), and upload line/token counts for quotas

Revision ID: 0002_keys
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_keys"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("project", sa.String(length=128), nullable=False),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=32), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
    )
    op.create_table(
        "projects",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("max_stored_bytes", sa.BigInteger(), nullable=True),
        sa.Column("max_active_batches", sa.BigInteger(), nullable=True),
        sa.Column("max_queued_lines", sa.BigInteger(), nullable=True),
        sa.Column("max_queued_tokens", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )

    op.add_column("files", sa.Column("line_count", sa.BigInteger(), nullable=True))
    op.add_column("files", sa.Column("est_tokens", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("files") as batch_op:
        batch_op.drop_column("est_tokens")
        batch_op.drop_column("line_count")
    op.drop_table("projects")
    op.drop_table("api_keys")
