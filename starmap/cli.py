"""`starmap <verb>`: the command line. Each package contributes its verbs through a `register(app)` function."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

import typer

from starmap.settings import Settings, get_settings

app = typer.Typer(
    name="starmap",
    help="See and steer the safety decisions of language models with sparse autoencoders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    ctx: typer.Context,
    data_dir: Optional[Path] = typer.Option(None, help="Overrides STARMAP_DATA_DIR."),
    database_url: Optional[str] = typer.Option(None, help="Overrides STARMAP_DATABASE_URL."),
    model: Optional[str] = typer.Option(None, help="Overrides STARMAP_MODEL."),
    device: Optional[str] = typer.Option(None, help="Overrides STARMAP_DEVICE."),
    dtype: Optional[str] = typer.Option(None, help="Overrides STARMAP_DTYPE."),
) -> None:
    overrides = {
        key: value
        for key, value in {
            "data_dir": data_dir,
            "database_url": database_url,
            "model": model,
            "device": device,
            "dtype": dtype,
        }.items()
        if value is not None
    }
    ctx.obj = get_settings().model_copy(update=overrides)


def settings_of(ctx: typer.Context) -> Settings:
    """The settings of this invocation (environment, then global CLI options)."""
    return ctx.find_root().obj or get_settings()


def fail(message: str) -> "typer.Exit":
    """Print a one-line error naming the problem and exit with status 2."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


# Each module has `register(app)`; the pipeline, the app and the engine add their own verbs.
VERB_MODULES = (
    "sae_engine.cli",
    "starmap.db.cli",
    "offline_pipeline.import_cli",
    "offline_pipeline.corpus.cli",
)


def _register_all() -> None:
    for name in VERB_MODULES:
        importlib.import_module(name).register(app)


_register_all()


if __name__ == "__main__":
    app()
