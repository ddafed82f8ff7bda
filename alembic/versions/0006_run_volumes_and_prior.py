"""run volumes and prior comparison: the study's volumes, the prior compared with, or why not

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('volumes', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('volumes_note', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('prior_study_uid', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('prior_run_id', sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column('prior_note', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('prior', sa.JSON(), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_runs_prior_run_id_runs'), 'runs', ['prior_run_id'], ['id'])


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_runs_prior_run_id_runs'), type_='foreignkey')
        batch_op.drop_column('prior')
        batch_op.drop_column('prior_note')
        batch_op.drop_column('prior_run_id')
        batch_op.drop_column('prior_study_uid')
        batch_op.drop_column('volumes_note')
        batch_op.drop_column('volumes')
