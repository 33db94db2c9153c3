"""slice embeddings (streaming)

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('slice_embedding',
    sa.Column('instance_id', sa.Integer(), nullable=False),
    sa.Column('model_key', sa.String(length=64), nullable=False),
    sa.Column('embedding', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['instance_id'], ['instance.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('instance_id', 'model_key')
    )


def downgrade() -> None:
    op.drop_table('slice_embedding')
