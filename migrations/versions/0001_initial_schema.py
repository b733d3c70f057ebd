"""Initial schema: every table of docs/ARCHITECTURE.md plus the full-text index over explanations.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES_IN_DROP_ORDER = (
    "scores",
    "feature_domains",
    "feature_concepts",
    "explanations",
    "examples",
    "features",
    "steering_presets",
    "saes",
    "sweep_results",
    "sae_sets",
    "concepts",
    "pipeline_runs",
    "models",
    "domains",
)


def _id() -> sa.Column:
    return sa.Column("id", sa.Integer(), primary_key=True)


def _ref(table: str, column: str, target: str) -> sa.Column:
    """A required reference to `target.id`; deleting the target deletes the row."""
    return sa.Column(
        column,
        sa.Integer(),
        sa.ForeignKey(f"{target}.id", ondelete="CASCADE", name=f"fk_{table}_{column}_{target}"),
        nullable=False,
    )


def upgrade() -> None:
    op.create_table(
        "domains",
        _id(),
        sa.Column("name", sa.String(64), nullable=False),
        sa.UniqueConstraint("name", name="uq_domains_name"),
    )
    op.create_table(
        "models",
        _id(),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("n_layers", sa.Integer(), nullable=False),
        sa.Column("d_model", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(255), nullable=True),
        sa.UniqueConstraint("name", name="uq_models_name"),
    )
    op.create_table(
        "pipeline_runs",
        _id(),
        sa.Column("run_key", sa.String(128), nullable=False),
        sa.Column("preset", sa.String(64), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("chosen_config", sa.JSON(), nullable=True),
        sa.Column("selection_rule", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.UniqueConstraint("run_key", name="uq_pipeline_runs_run_key"),
    )
    op.create_table(
        "concepts",
        _id(),
        _ref("concepts", "domain_id", "domains"),
        sa.Column("name", sa.String(128), nullable=False),
        sa.UniqueConstraint("domain_id", "name", name="uq_concepts_domain_id_name"),
    )
    op.create_table(
        "sae_sets",
        _id(),
        _ref("sae_sets", "model_id", "models"),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("hook_kind", sa.String(32), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("expansion", sa.Integer(), nullable=False),
        sa.Column("d_sae", sa.Integer(), nullable=False),
        sa.Column("origin", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("model_id", "name", name="uq_sae_sets_model_id_name"),
    )
    op.create_index("ix_sae_sets_model_id", "sae_sets", ["model_id"])
    op.create_table(
        "sweep_results",
        _id(),
        _ref("sweep_results", "run_id", "pipeline_runs"),
        sa.Column("hook_kind", sa.String(32), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("domain", sa.String(64), nullable=True),
        sa.Column("metric", sa.String(32), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("value", sa.Float(), nullable=True),
    )
    op.create_index("ix_sweep_results_run_id_metric", "sweep_results", ["run_id", "metric"])
    op.create_table(
        "saes",
        _id(),
        _ref("saes", "sae_set_id", "sae_sets"),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("hook_name", sa.String(128), nullable=False),
        sa.Column("checkpoint_path", sa.Text(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.UniqueConstraint("sae_set_id", "hook_name", name="uq_saes_sae_set_id_hook_name"),
    )
    op.create_index("ix_saes_sae_set_id_layer", "saes", ["sae_set_id", "layer"])
    op.create_table(
        "steering_presets",
        _id(),
        sa.Column("name", sa.String(255), nullable=False),
        _ref("steering_presets", "sae_set_id", "sae_sets"),
        sa.Column("interventions", sa.JSON(), nullable=False),
        sa.UniqueConstraint("name", name="uq_steering_presets_name"),
    )
    op.create_index("ix_steering_presets_sae_set_id", "steering_presets", ["sae_set_id"])
    op.create_table(
        "features",
        _id(),
        _ref("features", "sae_id", "saes"),
        _ref("features", "sae_set_id", "sae_sets"),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("feature_id", sa.String(32), nullable=False),
        sa.Column("density", sa.Float(), nullable=True),
        sa.Column("max_activation", sa.Float(), nullable=True),
        sa.Column("normaliser", sa.Float(), nullable=True),
        sa.Column("quantiles", sa.JSON(), nullable=True),
        sa.Column("histogram", sa.JSON(), nullable=True),
        sa.Column("top_tokens", sa.JSON(), nullable=True),
        sa.Column("bottom_tokens", sa.JSON(), nullable=True),
        sa.Column("umap_x", sa.Float(), nullable=True),
        sa.Column("umap_y", sa.Float(), nullable=True),
        sa.Column("is_safety", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("candidate_only", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.UniqueConstraint("sae_id", "index", name="uq_features_sae_id_index"),
        sa.UniqueConstraint("sae_set_id", "feature_id", name="uq_features_sae_set_id_feature_id"),
    )
    op.create_index("ix_features_sae_set_id_layer", "features", ["sae_set_id", "layer"])
    op.create_index("ix_features_sae_set_id_is_safety", "features", ["sae_set_id", "is_safety"])
    op.create_table(
        "examples",
        _id(),
        _ref("examples", "feature_id", "features"),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.JSON(), nullable=False),
        sa.Column("activations", sa.JSON(), nullable=False),
        sa.Column("source", sa.String(255), nullable=True),
    )
    op.create_index("ix_examples_feature_id_level_rank", "examples", ["feature_id", "level", "rank"])
    op.create_table(
        "explanations",
        _id(),
        _ref("explanations", "feature_id", "features"),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("language", sa.String(16), nullable=False),
        sa.Column("explainer", sa.String(32), nullable=False),
        sa.Column("explainer_model", sa.String(255), nullable=True),
        sa.Column("input_tokens", sa.Integer(), nullable=True),
        sa.Column("output_tokens", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_explanations_feature_id_language", "explanations", ["feature_id", "language"])
    op.create_table(
        "feature_concepts",
        _id(),
        _ref("feature_concepts", "feature_id", "features"),
        _ref("feature_concepts", "concept_id", "concepts"),
        sa.Column("precision", sa.Float(), nullable=True),
        sa.Column("recall", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
    )
    op.create_index("ix_feature_concepts_feature_id", "feature_concepts", ["feature_id"])
    op.create_index("ix_feature_concepts_concept_id", "feature_concepts", ["concept_id"])
    op.create_table(
        "feature_domains",
        _ref("feature_domains", "feature_id", "features"),
        _ref("feature_domains", "domain_id", "domains"),
        sa.Column("source", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("feature_id", "domain_id", name="pk_feature_domains"),
    )
    op.create_index("ix_feature_domains_domain_id", "feature_domains", ["domain_id"])
    op.create_table(
        "scores",
        _id(),
        _ref("scores", "explanation_id", "explanations"),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("simulator", sa.String(255), nullable=True),
        sa.Column("n_queries", sa.Integer(), nullable=True),
        sa.Column("n_parse_failures", sa.Integer(), nullable=True),
        sa.Column("input_tokens", sa.Integer(), nullable=True),
        sa.Column("output_tokens", sa.Integer(), nullable=True),
    )
    op.create_index("ix_scores_explanation_id", "scores", ["explanation_id"])
    _create_fulltext_index()


def downgrade() -> None:
    _drop_fulltext_index()
    for table in TABLES_IN_DROP_ORDER:
        op.drop_table(table)


# Full-text search over explanations.text (see starmap/db/search.py for the queries).
# SQLite: an FTS5 external-content table (it stores only the index, the text stays in
# `explanations`), kept in sync by triggers. PostgreSQL: a GIN index over the 'simple'
# text-search configuration (no stemming, no stop words: explanations are short and
# multilingual). Other dialects get no full-text index.

SQLITE_FTS_STATEMENTS = (
    """CREATE VIRTUAL TABLE explanations_fts USING fts5(
        text, content='explanations', content_rowid='id',
        tokenize='unicode61 remove_diacritics 2', prefix='2 3')""",
    """CREATE TRIGGER explanations_fts_insert AFTER INSERT ON explanations BEGIN
        INSERT INTO explanations_fts(rowid, text) VALUES (new.id, new.text);
    END""",
    """CREATE TRIGGER explanations_fts_delete AFTER DELETE ON explanations BEGIN
        INSERT INTO explanations_fts(explanations_fts, rowid, text) VALUES ('delete', old.id, old.text);
    END""",
    """CREATE TRIGGER explanations_fts_update AFTER UPDATE OF text ON explanations BEGIN
        INSERT INTO explanations_fts(explanations_fts, rowid, text) VALUES ('delete', old.id, old.text);
        INSERT INTO explanations_fts(rowid, text) VALUES (new.id, new.text);
    END""",
    # Index whatever rows exist already (none on a fresh database).
    "INSERT INTO explanations_fts(explanations_fts) VALUES ('rebuild')",
)

SQLITE_FTS_DROP_STATEMENTS = (
    "DROP TRIGGER IF EXISTS explanations_fts_update",
    "DROP TRIGGER IF EXISTS explanations_fts_delete",
    "DROP TRIGGER IF EXISTS explanations_fts_insert",
    "DROP TABLE IF EXISTS explanations_fts",
)

POSTGRES_TSV_INDEX = "ix_explanations_text_tsv"


def _create_fulltext_index() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for statement in SQLITE_FTS_STATEMENTS:
            op.execute(statement)
    elif dialect == "postgresql":
        op.execute(
            f"CREATE INDEX {POSTGRES_TSV_INDEX} ON explanations USING gin (to_tsvector('simple'::regconfig, text))"
        )


def _drop_fulltext_index() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for statement in SQLITE_FTS_DROP_STATEMENTS:
            op.execute(statement)
    elif dialect == "postgresql":
        op.execute(f"DROP INDEX IF EXISTS {POSTGRES_TSV_INDEX}")
