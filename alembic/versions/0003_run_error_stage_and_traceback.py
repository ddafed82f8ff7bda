"""run error stage and traceback

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 16:10:26.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('error_stage', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('error_traceback', sa.Text(), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_column('error_traceback')
        batch_op.drop_column('error_stage')
