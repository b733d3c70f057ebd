"""`starmap <verb>`: the command line. Each package contributes its verbs through a `register(app)` function."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from typer._click.exceptions import NoArgsIsHelpError, UsageError
from typer.core import TyperGroup

from starmap.settings import Settings, get_settings


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except NoArgsIsHelpError:
        raise
    except UsageError as error:
        where = f"{error.ctx.command_path}: " if error.ctx is not None else ""
        raise fail(where + error.format_message()) from None


class OneLineErrors(TyperGroup):
    """Bad options and arguments of any verb end as one `error:` line on stderr with status 2, like `fail`."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _one_line_usage_errors():
            return super().invoke(ctx)


app = typer.Typer(
    name="starmap",
    help="See and steer the safety decisions of language models with sparse autoencoders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=OneLineErrors,
)


@app.callback()
def _root(
    ctx: typer.Context,
    data_dir: Path | None = typer.Option(None, help="Overrides STARMAP_DATA_DIR."),
    database_url: str | None = typer.Option(None, help="Overrides STARMAP_DATABASE_URL."),
    model: str | None = typer.Option(None, help="Overrides STARMAP_MODEL."),
    device: str | None = typer.Option(None, help="Overrides STARMAP_DEVICE."),
    dtype: str | None = typer.Option(None, help="Overrides STARMAP_DTYPE."),
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


def fail(message: str) -> typer.Exit:
    """Print a one-line error naming the problem and exit with status 2."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


# Each module has `register(app)`; the pipeline, the app and the engine add their own verbs.
VERB_MODULES = (
    "sae_engine.cli",
    "starmap.db.cli",
    "offline_pipeline.import_cli",
    "offline_pipeline.corpus.cli",
    "offline_pipeline.explain.cli",
    "offline_pipeline.cli",
    "app.cli",
)


def _register_all() -> None:
    for name in VERB_MODULES:
        importlib.import_module(name).register(app)


_register_all()


if __name__ == "__main__":
    app()
