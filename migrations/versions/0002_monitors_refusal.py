"""Monitors of an SAE set (dense probes and k-sparse SAE probes per domain, `offline_pipeline.monitor`) and its
refusal directions (per hooked layer, `offline_pipeline.stages.refusal`); steering presets gain a description,
their measured figures and an example prompt (the flip search's presets carry them).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "monitors",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "sae_set_id",
            sa.Integer(),
            sa.ForeignKey("sae_sets.id", ondelete="CASCADE", name="fk_monitors_sae_set_id_sae_sets"),
            nullable=False,
        ),
        sa.Column("domain", sa.String(64), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=True),
        sa.Column("representation", sa.String(16), nullable=True),
        sa.Column("features", sa.JSON(), nullable=True),
        sa.Column("weights", sa.JSON(), nullable=False),
        sa.Column("bias", sa.Float(), nullable=False),
        sa.Column("calibration", sa.JSON(), nullable=False),
        sa.Column("auroc_validation", sa.Float(), nullable=True),
        sa.Column("n_train", sa.Integer(), nullable=False),
        sa.Column("n_validation", sa.Integer(), nullable=False),
        sa.UniqueConstraint("sae_set_id", "domain", "method", name="uq_monitors_sae_set_id_domain_method"),
    )
    op.create_index("ix_monitors_sae_set_id", "monitors", ["sae_set_id"])
    op.create_table(
        "refusal_directions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "sae_set_id",
            sa.Integer(),
            sa.ForeignKey("sae_sets.id", ondelete="CASCADE", name="fk_refusal_directions_sae_set_id_sae_sets"),
            nullable=False,
        ),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("hook_name", sa.String(128), nullable=False),
        sa.Column("direction", sa.JSON(), nullable=False),
        sa.Column("norm", sa.Float(), nullable=False),
        sa.Column("n_refused", sa.Integer(), nullable=False),
        sa.Column("n_answered", sa.Integer(), nullable=False),
        sa.UniqueConstraint("sae_set_id", "layer", name="uq_refusal_directions_sae_set_id_layer"),
    )
    op.create_index("ix_refusal_directions_sae_set_id", "refusal_directions", ["sae_set_id"])
    with op.batch_alter_table("steering_presets") as batch:
        batch.add_column(sa.Column("description", sa.Text(), nullable=True))
        batch.add_column(sa.Column("figures", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("example", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("steering_presets") as batch:
        batch.drop_column("example")
        batch.drop_column("figures")
        batch.drop_column("description")
    op.drop_index("ix_refusal_directions_sae_set_id", table_name="refusal_directions")
    op.drop_table("refusal_directions")
    op.drop_index("ix_monitors_sae_set_id", table_name="monitors")
    op.drop_table("monitors")
