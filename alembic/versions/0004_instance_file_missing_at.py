"""instance file_missing_at: rows whose spooled file was found missing at start-up

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 16:45:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('file_missing_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('file_missing_at')
