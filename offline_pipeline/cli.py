"""`starmap pipeline run|status` and `starmap report`."""

from __future__ import annotations

from pathlib import Path

import typer

pipeline_app = typer.Typer(help="The offline pipeline: corpus -> SAEs -> safety features -> database.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(pipeline_app, name="pipeline")
    app.command("report")(report_command)


SEED_HELP = "Seed of the SAEs and of the examples drawn from them (corpus and activations stay shared); default: the preset's."


def _resolve(ctx: typer.Context, preset_name: str, run_dir: Path | None, seed: int | None):
    from dataclasses import replace

    from offline_pipeline.pipeline import stages_for
    from offline_pipeline.presets import PresetError, for_model, get_preset
    from starmap.cli import fail, settings_of

    settings = settings_of(ctx)
    try:
        preset = get_preset(preset_name)
    except ValueError as exc:
        raise fail(f"--preset: {exc}") from None
    try:
        preset = for_model(preset, settings.model, settings.ensure_data_dir())
    except PresetError as exc:
        raise fail(f"--model: {exc}") from None
    if seed is not None:
        preset = replace(preset, train=replace(preset.train, seed=seed))
    folder = run_dir or settings.data_dir / "runs" / preset.run_key
    return settings, preset, folder, stages_for(preset, settings)


@pipeline_app.command("run")
def run_command(
    ctx: typer.Context,
    preset: str = typer.Option("quick", "--preset", help="quick | paper | tiny"),
    run_dir: Path | None = typer.Option(None, help="The run folder (default: <data_dir>/runs/<preset>-<hash>)."),
    force_stage: list[str] = typer.Option([], "--force-stage", help="Re-run this stage and every stage after it (repeatable)."),
    seed: int | None = typer.Option(None, min=0, help=SEED_HELP),
    reuse: list[Path] = typer.Option(
        [], "--reuse", help="Another run folder: its finished stages with the same settings are linked, not recomputed (repeatable)."
    ),
) -> None:
    """Run every stage that is not finished yet; a killed run resumes where it stopped."""
    from offline_pipeline.runner import PipelineError, run_stages, status
    from starmap.cli import fail, settings_of

    # Destinations first: resolving the model may de-quantise it, which a bad --run-dir should not wait for.
    if run_dir is not None:
        _check_folder(run_dir)
    for other in reuse:
        if not other.is_dir():
            raise fail(f"--reuse: no run folder {other}")
    settings = settings_of(ctx)
    settings.ensure_data_dir()
    _check_database(settings.resolved_database_url)
    settings, preset_obj, folder, stages = _resolve(ctx, preset, run_dir, seed)
    _check_folder(folder)
    typer.echo(f"run folder: {folder}")
    typer.echo(f"model: {preset_obj.model} on {preset_obj.device} in {preset_obj.dtype}")
    try:
        run_stages(stages, preset_obj, settings, folder, force=force_stage, log=typer.echo, reuse=reuse)
    except PipelineError as exc:
        raise fail(str(exc)) from None
    total = 0.0
    for row in status(stages, preset_obj, folder):
        total += row.seconds or 0.0
        typer.echo(f"  {row.name:<12} {row.seconds or 0:>8.1f} s")
    typer.echo(f"  {'total':<12} {total:>8.1f} s (stage time, across resumed runs)")
    typer.echo(f"database: {settings.resolved_database_url}")


def _check_folder(folder: Path) -> None:
    """Refuse a run folder the run could not write, before an hour of work rather than after."""
    from starmap.cli import fail

    if folder.exists() and not folder.is_dir():
        raise fail(f"--run-dir: {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise fail(f"--run-dir: cannot write to {folder} ({exc.strerror or exc})") from None


def _check_database(database_url: str) -> None:
    """Refuse a database the run could not write (migrating it up front, as the run will)."""
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from starmap.cli import fail
    from starmap.db.engine import DatabaseFileError, check_sqlite_file
    from starmap.db.migrate import upgrade

    try:
        check_sqlite_file(database_url)
        upgrade(database_url)
    except DatabaseFileError as exc:
        raise fail(f"--database-url: {exc}") from None
    except (ArgumentError, SQLAlchemyError, OSError) as exc:
        raise fail(f"--database-url: cannot open {database_url} ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


@pipeline_app.command("status")
def status_command(
    ctx: typer.Context,
    preset: str = typer.Option("quick", "--preset", help="quick | paper | tiny"),
    run_dir: Path | None = typer.Option(None, help="The run folder (default: <data_dir>/runs/<preset>-<hash>)."),
    seed: int | None = typer.Option(None, min=0, help=SEED_HELP),
) -> None:
    """Which stages of a run are finished, with their timings."""
    from offline_pipeline.runner import status

    _, preset_obj, folder, stages = _resolve(ctx, preset, run_dir, seed)
    typer.echo(f"run folder: {folder}")
    for row in status(stages, preset_obj, folder):
        state = f"done {row.seconds:>8.1f} s" if row.done else "pending"
        typer.echo(f"  {row.name:<12} {state:<16} {row.folder.name}")


def report_command(
    ctx: typer.Context,
    out: Path = typer.Option(Path("starmap-report.html"), "--out", help="The HTML file to write."),
    run_key: str | None = typer.Option(None, help="A pipeline run (default: the latest finished one)."),
    monitor: Path | None = typer.Option(None, "--monitor", help="Per-prompt held-out scores from `make bench-monitor`."),
) -> None:
    """Write one self-contained HTML report of a pipeline run (Plotly inlined, no network needed)."""
    from offline_pipeline.report import ReportError, write_report
    from starmap.cli import fail, settings_of

    settings = settings_of(ctx)
    try:
        if monitor is not None and not monitor.is_file():
            raise ReportError(f"--monitor: no file {monitor}")
        path = write_report(settings.resolved_database_url, out, run_key, monitor)
    except ReportError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"report: {path}")
