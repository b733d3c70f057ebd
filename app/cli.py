"""`starmap serve`: the web app on 127.0.0.1 by default."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    ctx: typer.Context,
    host: str | None = typer.Option(None, help="Interface to bind (default 127.0.0.1, from STARMAP_HOST)."),
    port: int | None = typer.Option(None, min=0, max=65535, help="Port (default 8000, from STARMAP_PORT)."),
    model: str | None = typer.Option(None, help="Model to load: an embedded one (qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, smollm2), a Hub id in the local cache, or a path."),
    db: str | None = typer.Option(None, "--db", help="Database URL (default: the SQLite file in the data directory)."),
    queue_size: int = typer.Option(8, min=1, help="Generation requests that may wait; more answer 503."),
    max_new_tokens: int = typer.Option(512, min=1, max=4096, help="Largest max_new_tokens a request may ask for."),
    no_model: bool = typer.Option(False, "--no-model", help="Browse only: map, feature pages and search, no live model."),
) -> None:
    """Serve the chat overlay, neuron map, feature pages, trace/compare and steering."""
    import uvicorn

    from app.access import exposed
    from app.main import StartupError, create_app
    from app.state import ServerOptions
    from starmap.cli import fail, settings_of

    overrides = {k: v for k, v in {"host": host, "port": port, "model": model, "database_url": db}.items() if v is not None}
    settings = settings_of(ctx).model_copy(update=overrides)
    options = ServerOptions(queue_size=queue_size, max_new_tokens=max_new_tokens, load_model=not no_model)
    try:
        app = create_app(settings, options)
    except StartupError as error:
        raise fail(str(error)) from None
    if exposed(settings):
        typer.secho(f"warning: binding {settings.host} exposes the model and the database beyond this machine; "
                    "model runs and writes need the API token", fg=typer.colors.YELLOW, err=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
