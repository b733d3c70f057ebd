"""`starmap import safe-sail`: load the public Safe-SAIL release into the database."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import_app = typer.Typer(name="import", help="Import released SAE feature databases.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(import_app, name="import")


@import_app.command("safe-sail")
def safe_sail_command(
    ctx: typer.Context,
    db: Annotated[Path, typer.Option("--db", help="The release's English database, en_db.json.")],
    db_zh: Annotated[Path | None, typer.Option("--db-zh", help="The release's Chinese database, cn_db.json.")] = None,
    indices: Annotated[
        Path | None,
        typer.Option(help="Folder with indices_layer{L}.pt: candidates become features without explanation."),
    ] = None,
    checkpoints: Annotated[
        Path | None, typer.Option(help="Folder with ckpt_layer{L}.pt, recorded as each SAE's checkpoint.")
    ] = None,
    quantiles: Annotated[
        Path | None,
        typer.Option(help="Folder with quantiles_layer{L}.pt: per-feature normalisers (1-D, length 20480)."),
    ] = None,
) -> None:
    """Import the Safe-SAIL release (Qwen2.5-3B-Instruct, layers 0/8/17/26/35); re-running changes nothing."""
    # Imported here: the importer reads .pt files with torch, which `starmap --help` should not wait for.
    from offline_pipeline.safe_sail_import import SafeSailImportError, SafeSailSources, import_safe_sail
    from starmap.cli import fail
    from starmap.db import migrate
    from starmap.db.cli import database_url, shown_url
    from starmap.db.engine import make_engine, make_sessionmaker

    url = database_url(ctx)
    migrate.upgrade(url)
    engine = make_engine(url)
    sources = SafeSailSources(
        en_db=db, zh_db=db_zh, indices_dir=indices, checkpoints_dir=checkpoints, quantiles_dir=quantiles
    )
    try:
        with make_sessionmaker(engine).begin() as session:
            summary = import_safe_sail(session, sources)
    except SafeSailImportError as error:
        raise fail(str(error)) from error
    finally:
        engine.dispose()

    typer.echo(f"{shown_url(url)}: SAE set {summary.sae_set_id}, layers {', '.join(map(str, summary.layers))}")
    typer.echo(f"features: {summary.features:,} with a release entry, {summary.candidate_features:,} candidates only")
    languages = ", ".join(f"{count:,} {language}" for language, count in sorted(summary.explanations.items()))
    typer.echo(f"explanations: {languages or 'none'}; scores: {summary.scores:,}")
    domains = ", ".join(f"{name} {count:,}" for name, count in summary.domain_counts.items())
    typer.echo(f"safety features (with a domain tag): {summary.tagged_features:,} ({domains})")
    if summary.en_without_explanation:
        typer.echo(f"{len(summary.en_without_explanation)} English entries have no explanation (null in {db.name})")
    if summary.zh_only_skipped:
        typer.echo(
            f"skipped {len(summary.zh_only_skipped)} Chinese entries absent from {db.name}: "
            + ", ".join(summary.zh_only_skipped)
        )
    changed = "; ".join(
        f"{name} +{c['inserted']} ~{c['updated']} -{c['deleted']}"
        for name, c in summary.changes.items()
        if sum(c.values())
    )
    typer.echo(f"rows changed: {changed or 'none (already imported)'}")
